"""medfm.engines.SupervisedTrainer: gradient accumulation (one all-reduce per step under DDP) and the check that
every trainable parameter gets a gradient."""

import json
import textwrap

import pytest
import torch
from monai.networks.utils import freeze_layers
from torch import nn

from medfm.engines import SupervisedTrainer
from medfm.errors import MedfmError
from tests.conftest import REPO, TORCHRUN, run_command

pytestmark = pytest.mark.training


def _xy(batch, device, non_blocking, **kwargs):
    return batch[0].to(device), batch[1].to(device)


def _train(network, data, batch_size, accumulation_steps=1, epochs=1):
    """Train ``network`` with SGD on ``data`` (inputs, targets); return the trainer and its optimizer-step count."""
    optimizer = torch.optim.SGD([p for p in network.parameters() if p.requires_grad], lr=0.1)
    steps = []
    optimizer.register_step_post_hook(lambda *args: steps.append(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data), batch_size=batch_size)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=epochs, train_data_loader=loader, network=network,
                                optimizer=optimizer, loss_function=nn.MSELoss(), prepare_batch=_xy,
                                accumulation_steps=accumulation_steps)
    trainer.run()
    return trainer, len(steps)


def _data(count=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, generator=generator), torch.randn(count, 1, generator=generator)


def test_accumulating_n_batches_steps_as_one_batch_n_times_larger():
    data = _data()
    torch.manual_seed(1)
    accumulated, reference = nn.Linear(3, 1), nn.Linear(3, 1)
    reference.load_state_dict(accumulated.state_dict())
    _, accumulated_steps = _train(accumulated, data, batch_size=1, accumulation_steps=4, epochs=2)
    _, reference_steps = _train(reference, data, batch_size=4, epochs=2)
    assert accumulated_steps == reference_steps == 4
    for a, b in zip(accumulated.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.equal(accumulated.weight, nn.Linear(3, 1).weight)


def test_the_shorter_last_group_of_an_epoch_still_steps():
    _, steps = _train(nn.Linear(3, 1), _data(count=5), batch_size=1, accumulation_steps=2, epochs=3)
    assert steps == 3 * 3  # groups of 2, 2 and 1 batches in each epoch


class WithUnusedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(3, 1)
        self.unused = nn.Linear(3, 1)

    def forward(self, x):
        return self.used(x)


def test_a_trainable_parameter_without_gradient_is_named_on_the_first_step():
    with pytest.raises(MedfmError, match=r"^2 trainable parameter\(s\) received no gradient in the first step: unused.weight, "
                                         r"unused.bias; freeze them in the config \(freeze_layers\) or use them$"):
        _train(WithUnusedLayer(), _data(), batch_size=2)
    network = WithUnusedLayer()
    freeze_layers(network, freeze_vars="^unused[.]")
    trainer, steps = _train(network, _data(), batch_size=2)
    assert steps == trainer.state.iteration == 4


@pytest.mark.parametrize("steps", [0, -1, 1.5, True])
def test_accumulation_steps_must_be_a_whole_number_of_batches(steps):
    with pytest.raises(MedfmError, match=r"accumulation_steps \(--accumulate\) must be a whole number >= 1"):
        _train(nn.Linear(3, 1), _data(), batch_size=1, accumulation_steps=steps)


WORKER = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from torch import nn
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from tests.engines.test_trainer import _data, _train

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    inputs, targets = _data()
    torch.manual_seed(1)
    network = nn.Linear(3, 1)
    reference = nn.Linear(3, 1)
    reference.load_state_dict(network.state_dict())
    ddp = nn.parallel.DistributedDataParallel(network)
    all_reduces = []

    def counting_all_reduce(state, bucket):
        all_reduces.append(1)
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, counting_all_reduce)
    # rank r trains on samples 4r..4r+3, one per batch, 2 batches per step: each step averages 4 samples
    _, steps = _train(ddp, (inputs[4 * rank:4 * rank + 4], targets[4 * rank:4 * rank + 4]), batch_size=1,
                      accumulation_steps=2)
    # the same steps in one process: batches of the 4 samples each step saw on both ranks
    order = [0, 1, 4, 5, 2, 3, 6, 7]
    _train(reference, (inputs[order], targets[order]), batch_size=4)
    close = all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(network.parameters(), reference.parameters()))
    state = [p.detach().numpy().tobytes().hex() for p in network.parameters()]
    json.dump({"all_reduces": len(all_reduces), "steps": steps, "state": state, "matches_one_process": close},
              open(f"{sys.argv[1]}/rank{rank}.json", "w"))
    dist.destroy_process_group()
""")


def test_under_ddp_accumulation_all_reduces_once_per_step_and_ranks_agree(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    result = run_command([*TORCHRUN, str(script), str(tmp_path)], env={"PYTHONPATH": str(REPO)}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for record in records:
        # 4 batches, 2 optimizer steps: DDP's all-reduce hook ran for the last batch of each step only
        assert (record["steps"], record["all_reduces"]) == (2, 2)
        assert record["matches_one_process"]
    assert records[0]["state"] == records[1]["state"]
