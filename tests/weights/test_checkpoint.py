import os
import pickle

import numpy
import pytest
import torch
from safetensors.torch import save_file

from medfm.errors import WeightsError
from medfm.weights import load_checkpoint, sha256_of
from medfm.weights.checkpoint import save_state_dict
from tests.conftest import save_upstream_checkpoint


class _Payload:
    """Pickling this runs os.system on load: a stand-in for a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [True, False])
def test_upstream_checkpoint_loads_with_weights_only(tmp_path, legacy):
    path = tmp_path / "Genesis_Chest_CT.pt"
    weights = save_upstream_checkpoint(path, legacy=legacy)
    checkpoint = load_checkpoint(path)
    assert set(checkpoint) == {"epoch", "state_dict", "optimizer_state_dict"}
    torch.testing.assert_close(checkpoint["state_dict"]["module.out_tr.final_conv.weight"], weights["out_tr.final_conv.weight"])


@pytest.mark.parametrize("strip_objects", [False, True])
def test_checkpoint_with_pickled_callable_is_refused_and_not_executed(tmp_path, strip_objects):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": _Payload(marker)}, path)
    with pytest.raises(WeightsError, match=r"evil\.pt: refused: the checkpoint would call posix\.system") as info:
        load_checkpoint(path, strip_objects=strip_objects)
    assert "\n" not in str(info.value)
    assert not marker.exists()


class _TrainingConfig:
    """A class only the training code knows (like an mmcv Config in a checkpoint's meta)."""

    def __init__(self, marker):
        self.marker = marker

    def __setstate__(self, state):
        open(state["marker"], "w").close()  # would run if the real class were used


@pytest.mark.parametrize("legacy", [True, False])
def test_foreign_objects_are_refused_or_dropped_without_running_their_code(tmp_path, legacy, caplog):
    marker = tmp_path / "executed"
    path = tmp_path / "mmcls.pth"
    weights = {"conv.weight": torch.rand(2, 3)}
    meta = {"config": _TrainingConfig(str(marker)), "mean": numpy.arange(3), "CLASSES": ["a", "b"], "epoch": 100}
    torch.save({"meta": meta, "state_dict": weights}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(WeightsError, match=r"mmcls\.pth: refused: .*_TrainingConfig.*--strip_objects"):
        load_checkpoint(path)
    checkpoint = load_checkpoint(path, strip_objects=True)
    assert checkpoint["meta"] == {"CLASSES": ["a", "b"], "epoch": 100}
    torch.testing.assert_close(checkpoint["state_dict"]["conv.weight"], weights["conv.weight"])
    assert not marker.exists()
    assert "dropped pickled objects of" in caplog.text and "_TrainingConfig" in caplog.text


def test_unreadable_and_missing_files(tmp_path):
    garbage = tmp_path / "model.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="model.pt: not a readable PyTorch checkpoint"):
        load_checkpoint(garbage)
    with pytest.raises(WeightsError, match="no such file"):
        load_checkpoint(tmp_path / "absent.pt")
    truncated = tmp_path / "cut.pt"
    save_upstream_checkpoint(truncated, legacy=False)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="cut.pt: not a readable"):
        load_checkpoint(truncated)


def test_safetensors_and_atomic_save(tmp_path):
    tensors = {"a": torch.arange(4.0)}
    save_file(tensors, tmp_path / "w.safetensors")
    torch.testing.assert_close(load_checkpoint(tmp_path / "w.safetensors")["a"], tensors["a"])
    target = save_state_dict(tensors, tmp_path / "out" / "model.pt")
    assert load_checkpoint(target)["a"].tolist() == [0, 1, 2, 3]
    assert [p.name for p in target.parent.iterdir()] == ["model.pt"]
    assert len(sha256_of(target)) == 64


def test_pickle_protocol_error_is_the_one_torch_raises(tmp_path):
    # guards the exception type load_checkpoint relies on to tell unsafe files from broken ones
    path = tmp_path / "obj.pt"
    torch.save({"x": _Payload(tmp_path / "m")}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
