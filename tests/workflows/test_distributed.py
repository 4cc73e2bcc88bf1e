"""end_distributed_run: what a torchrun worker does once its workflow has finished."""

import sys
import textwrap

import torch.distributed as dist

from medfm.workflows import end_distributed_run
from tests.conftest import run_command

WORKER = textwrap.dedent("""
    import atexit, os, sys, torch, torch.distributed as dist
    from medfm.workflows import end_distributed_run

    class Writer:
        def close(self):
            open(os.path.join(sys.argv[1], f"closed.rank{dist.get_rank()}"), "w").close()

    dist.init_process_group("gloo")
    network = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    network(torch.randn(3, 4)).sum().backward()
    atexit.register(lambda: open(os.path.join(sys.argv[1], f"atexit.rank{os.environ['RANK']}"), "w").close())
    end_distributed_run([Writer(), object()])
    print("still running after end_distributed_run")
""")


def test_a_torchrun_worker_closes_its_writers_runs_its_exit_handlers_and_ends(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    result = run_command([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path)], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "still running" not in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "worker.py") == [
        "atexit.rank0", "atexit.rank1", "closed.rank0", "closed.rank1"]


def test_outside_torchrun_the_interpreter_keeps_running(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    closed = []

    class Writer:
        def close(self):
            closed.append(True)

    end_distributed_run([Writer()])
    assert closed == [True] and not dist.is_initialized()
