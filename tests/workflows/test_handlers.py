import pytest
import torch

from medfm.errors import WeightsError
from medfm.networks import GenesisUNet3D
from medfm.workflows import PretrainedWeightsLoader


@pytest.fixture
def pretrained(tmp_path):
    torch.manual_seed(0)
    source = GenesisUNet3D()
    path = tmp_path / "model.pt"
    torch.save(source.state_dict(), path)
    return source, path


@pytest.mark.parametrize("wrap", [None, "model", "state_dict"])
def test_loads_matching_tensors_and_keeps_a_new_head_fresh(pretrained, tmp_path, wrap):
    source, path = pretrained
    if wrap:
        torch.save({wrap: source.state_dict()}, path)
    target = GenesisUNet3D(out_channels=3, output_activation=None)
    fresh_head = target.out_tr.final_conv.weight.detach().clone()
    report = PretrainedWeightsLoader(path, target)()
    assert len(report["loaded"]) == 104 and report["shape_differs"] == ["out_tr.final_conv.weight", "out_tr.final_conv.bias"]
    torch.testing.assert_close(target.down_tr512.ops[1].conv1.weight, source.down_tr512.ops[1].conv1.weight)
    torch.testing.assert_close(target.out_tr.final_conv.weight, fresh_head)


def test_a_checkpoint_that_matches_nothing_is_an_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(WeightsError, match="only 0 of 106 network tensors match"):
        PretrainedWeightsLoader(path, GenesisUNet3D())()


def test_too_small_a_match_is_an_error(pretrained):
    source, path = pretrained
    torch.save({k: v for k, v in source.state_dict().items() if k.startswith("down_tr64")}, path)
    with pytest.raises(WeightsError, match="only 14 of 106"):
        PretrainedWeightsLoader(path, GenesisUNet3D())()
    assert len(PretrainedWeightsLoader(path, GenesisUNet3D(), min_fraction=0.1)()["loaded"]) == 14
