"""Shared fixtures: repository paths, bundle copies, a loopback HTTP server, small real data."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import medfm
from medfm.networks import GenesisUNet3D
from medfm.weights import load_checkpoint

from . import testdata

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
GENESIS = BUNDLES / "models_genesis_chest_ct"


def run_command(args: list[str], cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
    """Run a command with the test interpreter's environment; return the CompletedProcess."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def cli_in_process(argv: list[str], capfd) -> subprocess.CompletedProcess:
    """The CLI run in this process (``medfm.cli.main``), reported as ``run_command`` reports a subprocess: for
    checks of messages and outputs, where starting Python again (seconds each) is not what is tested. The loggers'
    handlers are put back afterwards: a bundle's logging.conf and MONAI's StatsHandler point theirs at this test's
    captured output, which is closed once the test ends."""
    import logging

    capfd.readouterr()  # only what this call prints

    def loggers():
        return [logging.root, *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))]

    saved = {id(logger): (logger, logger.handlers[:], logger.level) for logger in loggers()}
    try:
        from medfm import cli

        code = cli.main(argv)
    finally:
        for logger in loggers():
            logger.handlers[:], logger.level = saved.get(id(logger), (logger, [], logger.level))[1:]
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["medfm", *argv], code, out, err)


def bundle_run(bundle: Path, configs: list[str], *overrides: str, launcher: list[str] | None = None, timeout: int = 600,
               check: bool = True, env: dict | None = None):
    """``python -m monai.bundle run`` with the given configs; asserts success (unless not ``check``) and returns the process."""
    config = configs[0] if len(configs) == 1 else "[" + ",".join(f"'{c}'" for c in configs) + "]"
    args = (launcher or [sys.executable]) + ["-m", "monai.bundle", "run", "--config_file", config,
                                             "--meta_file", "configs/metadata.json", "--bundle_root", str(bundle), *overrides]
    result = run_command(args, cwd=bundle, timeout=timeout, env=env)
    assert not check or result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def assert_written_by_rank_zero(output_dir: Path, epochs: int = 1, checkpoint: str = "model.pt",
                                state_dir: str = "training_state", log: str | None = None, runs: int = 1) -> None:
    """After ``runs`` 2-process DDP runs into one folder: one process of each wrote TensorBoard events (and, given
    the last run's ``log``, logged its iterations); the checkpoint and the one training state of the last epoch exist."""
    writers = {name.split(".")[-2] for name in (p.name for p in (output_dir / "logs").glob("events.out.tfevents.*"))}
    assert len(writers) == runs, f"TensorBoard events written by processes {writers}"
    events = b"".join(p.read_bytes() for p in (output_dir / "logs").glob("events.out.tfevents.*"))
    assert b"train_loss" in events, "the TensorBoard writer was not flushed before the process ended"
    assert (output_dir / "models" / checkpoint).is_file()
    assert [p.name for p in (output_dir / state_dir).iterdir()] == [f"training_state_epoch={epochs}.pt"]
    if log is not None:
        assert log.count(f"Epoch: {epochs}/{epochs}, Iter: 1/") == 1, "exactly one rank logs iterations"


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def torchrun_pretraining(bundle: Path, configs: list[str], output_dir: Path, *overrides: str, epochs: int = 1,
                         resume: bool = False) -> tuple[str, list[list[str]]]:
    """Run ``configs`` plus ``multi_gpu_pretrain.json`` with 2 gloo processes for ``epochs``; return the log and,
    per rank, the ``source`` of every item it trained on (recorded by a test-only overlay, in order)."""
    record = output_dir.parent / f"{output_dir.name}_record_sources.json"
    record.write_text(json.dumps({"run": [
        "$@train#trainer.add_event_handler(monai.engines.workflow.Events.ITERATION_COMPLETED, lambda engine: open("
        "@output_dir + '/sources_rank' + str(torch.distributed.get_rank()) + '.txt', 'a').write("
        "''.join(item['source'] + chr(10) for item in engine.state.batch)))",
        "$@train#trainer.run()"]}))
    for rank in (0, 1):
        (output_dir / f"sources_rank{rank}.txt").unlink(missing_ok=True)
    result = bundle_run(bundle, [*configs, "configs/multi_gpu_pretrain.json", str(record)], "--output_dir",
                        str(output_dir), "--max_epochs", str(epochs), "--resume", str(resume), *overrides,
                        launcher=TORCHRUN)
    seen = [(output_dir / f"sources_rank{rank}.txt").read_text().split() for rank in (0, 1)]
    return result.stdout + result.stderr, seen


def assert_pretraining_shared_out(seen: list[list[str]], sources: set[str]) -> None:
    """The two ranks trained on disjoint scans that together are all of ``sources``."""
    assert seen[0] and seen[1], f"a rank trained on nothing: {seen}"
    assert not set(seen[0]) & set(seen[1]), f"both ranks trained on {set(seen[0]) & set(seen[1])}"
    assert set(seen[0]) | set(seen[1]) == sources


def assert_resumed_on_both_ranks(output_dir: Path, log: str, state_dir: str, iterations_per_epoch: int) -> None:
    """After a 1-epoch run and a ``--resume True`` run to epoch 2: every rank resumed, and the schedule went on."""
    assert log.count(f"1 epochs ({iterations_per_epoch} iterations) done") == 2, "each rank loads the training state"
    state = load_checkpoint(output_dir / state_dir / "training_state_epoch=2.pt")
    assert state["trainer"]["iteration"] == 2 * iterations_per_epoch


@pytest.fixture
def genesis_bundle(tmp_path) -> Path:
    """A private copy of the Models Genesis bundle (tests may overwrite its weights)."""
    target = tmp_path / "models_genesis_chest_ct"
    shutil.copytree(GENESIS, target, ignore=shutil.ignore_patterns("eval", "finetune", "pretrain"))
    return target


def crop_nifti(source: str, target: Path, size: tuple[int, int, int], offset=(0, 0, 0)) -> Path:
    """Write a crop of a real volume with its affine moved to the crop's first voxel."""
    image = nib.load(source)
    data = np.asarray(image.dataobj)
    window = tuple(slice(o, o + s) for o, s in zip(offset, size))
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ np.asarray(offset) + image.affine[:3, 3]
    nib.save(nib.Nifti1Image(data[window], affine), target)
    return target


def write_modality_classification_table(folder: Path, size: int = 48) -> Path:
    """Classification table (``dataset.csv``: image, label, modality) from the real volumes: ``size``^3 crops of
    the head CT (label CT) and of the head T1 MRI (label MR), each row tagged with its modality; ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for sample, modality in (("ct_head", "CT"), ("mr_head_t1", "MR")):
        shape = nib.load(medfm.samples.path(sample)).shape
        for index in range(4):
            offset = tuple(int(s * (0.2 + 0.1 * index)) for s in shape)
            crop = crop_nifti(medfm.samples.path(sample), folder / f"{modality}_{index}.nii.gz", (size,) * 3, offset)
            rows.append(f"{crop.name},{modality},{modality}\n")
    order = [0, 4, 1, 5, 2, 6, 3, 7]  # both classes in the last quarter (validation)
    (folder / "dataset.csv").write_text("image,label,modality\n" + "".join(rows[i] for i in order))
    return folder


@pytest.fixture(scope="session")
def real_file():
    """``real_file(name)``: path of a real image from tests/testdata.py (skips or fails when absent)."""

    def get(name: str) -> Path:
        item = testdata.FILES[name]
        if not item.path.exists():
            message = f"real test image {name!r} ({item.registry} package {item.package}) is missing: run `make test-data`"
            if os.environ.get("MEDFM_REQUIRE_TEST_DATA") == "1":
                pytest.fail(message)
            pytest.skip(message)
        return item.path

    return get


@pytest.fixture(scope="session")
def small_ct(tmp_path_factory) -> Path:
    """A 64x48x40 crop of the embedded real head CT (int16 HU)."""
    folder = tmp_path_factory.mktemp("small_ct")
    return crop_nifti(medfm.samples.path("ct_head"), folder / "ct_small.nii.gz", (64, 48, 40), (4, 20, 18))


@pytest.fixture(scope="session")
def tiny_segmentation_dataset(tmp_path_factory) -> Path:
    """Decathlon-style folder: four crops of the real head CT; labels are synthetic (tissue above 25 HU)."""
    folder = tmp_path_factory.mktemp("tiny_dataset")
    source = medfm.samples.path("ct_head")
    items = []
    for index, offset in enumerate([(0, 0, 0), (6, 10, 8), (10, 30, 20), (3, 25, 30)]):
        image = crop_nifti(source, folder / f"ct_{index}.nii.gz", (40, 40, 24), offset)
        volume = nib.load(image)
        label = (np.asarray(volume.dataobj) > 25).astype(np.uint8)
        nib.save(nib.Nifti1Image(label, volume.affine), folder / f"ct_{index}_label.nii.gz")
        items.append({"image": image.name, "label": f"ct_{index}_label.nii.gz"})
    labels = {"0": "background", "1": "tissue above 25 HU (synthetic)"}
    (folder / "dataset.json").write_text(json.dumps({"name": "tiny", "labels": labels, "training": items}))
    return folder


def save_upstream_checkpoint(path: Path, legacy: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Save a checkpoint the way the Models Genesis trainer does; return the bare weights.

    nn.DataParallel keys (``module.``), SGD optimizer state after one step, the epoch, and
    (``legacy``) the pre-1.6 non-zip serialisation the published file probably uses.
    """
    torch.manual_seed(seed)
    model = GenesisUNet3D()
    parallel = torch.nn.DataParallel(model)
    optimizer = torch.optim.SGD(parallel.parameters(), lr=1.0, momentum=0.9)
    parallel(torch.rand(2, 1, 16, 16, 8)).mean().backward()
    optimizer.step()
    checkpoint = {"epoch": 12, "state_dict": parallel.state_dict(), "optimizer_state_dict": optimizer.state_dict()}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    return {k: v.clone() for k, v in model.state_dict().items()}


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single byte-range support; counts requests per path."""

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Range")))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404, "not found")
            return
        data = path.read_bytes()
        requested = self.headers.get("Range")
        if requested and self.server.ranges:
            start = int(requested.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_error(416, "range not satisfiable")
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            data = data[start:]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class LoopbackServer:
    def __init__(self, root: Path, ranges: bool = True):
        handler = lambda *a, **k: _RangeHandler(*a, directory=str(root), **k)  # noqa: E731
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.requests = []
        self.httpd.ranges = ranges
        self.root = root
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def requests(self) -> list:
        return self.httpd.requests

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_root(tmp_path) -> Path:
    root = tmp_path / "served"
    root.mkdir()
    return root


@pytest.fixture
def server(http_root):
    with LoopbackServer(http_root) as running:
        yield running


@pytest.fixture
def medfm_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "medfm_home"
    monkeypatch.setenv("MEDFM_HOME", str(home))
    return home


def require(missing: str | None) -> None:
    """Skip a test whose tool is missing here, or fail it in CI (MEDFM_REQUIRE_TEST_DATA=1: everything is installed)."""
    if missing is None:
        return
    if os.environ.get("MEDFM_REQUIRE_TEST_DATA") == "1":
        pytest.fail(missing)
    pytest.skip(missing)


def dciodvfy_errors(path: Path) -> list[str]:
    """The violations (``Error`` lines) the DICOM standard's validator ``dciodvfy`` (dicom3tools) finds in a file."""
    validator = shutil.which("dciodvfy")
    require(None if validator else "dciodvfy (Debian dicom3tools) is not installed: run `make dicom-validator`")
    result = subprocess.run([validator, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """A real Orthanc with DICOMweb on loopback (tests/orthanc.py), stopped by its PID after the module."""
    from .orthanc import Orthanc, missing

    require(missing())
    with Orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server
        assert server.process.poll() is None, "Orthanc died during the tests:\n" + server.log.read_text()[-3000:]
    assert server.process.poll() is not None
