import logging

import pytest
import torch
from monai.data import MetaTensor

from medfm.transforms import ModalityIntensity, ModalityIntensityd, RestoreIntensityd, resolve_modality


def _image(values, **meta):
    return MetaTensor(torch.as_tensor(values, dtype=torch.float32), meta={"filename_or_obj": "scan.nii.gz", **meta})


def test_ct_uses_the_hu_window_and_mr_its_own_range():
    ct = ModalityIntensity((-1000, 1000))(_image([[-2000.0, -1000.0, 0.0, 1000.0, 3000.0]]), "CT")
    torch.testing.assert_close(ct.as_tensor(), torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.0]]))
    mr = ModalityIntensity()(_image([[10.0, 20.0, 30.0]]), "MR")
    torch.testing.assert_close(mr.as_tensor(), torch.tensor([[0.0, 0.5, 1.0]]))
    assert ct.meta["intensity_range"] == (-1000.0, 1000.0) and mr.meta["intensity_range"] == (10.0, 30.0)


def test_modality_comes_from_dicom_then_from_the_values(caplog):
    assert resolve_modality(_image([[0.0, 5.0]], Modality="CT")) == "CT"
    assert resolve_modality(_image([[-1000.0, 5.0]]), "mr") == "MR"
    with caplog.at_level(logging.WARNING, logger="medfm.contract"):
        assert resolve_modality(_image([[-1024.0, 300.0]])) == "CT"
        assert resolve_modality(_image([[0.0, 300.0]])) == "MR"
        assert resolve_modality(_image([[-0.5, 0.7]])) == "MR"  # negative, but not integer units
        assert resolve_modality(_image([[-1000.0, 5.0]], descrip="T1 MPRAGE")) == "MR"
    assert ("scan.nii.gz: no modality given, treated as MR (no values like Hounsfield units (minimum 0)); if that is "
            "wrong pass --modality CT") in caplog.text
    assert "treated as MR, as its description says; if that is wrong pass --modality CT or --modality MR" in caplog.text


@pytest.mark.parametrize("sample, expected", [("ct_head", "CT"), ("mr_head_t1", "MR")])
def test_the_shipped_samples_are_told_apart_without_a_declared_modality(sample, expected, caplog):
    """The sample CT is a skull-stripped head (no air: -10 to 293 HU); its negative integer values still say CT."""
    import medfm

    scan = medfm.io.LoadScan()(medfm.samples.path(sample))
    with caplog.at_level(logging.WARNING, logger="medfm.contract"):
        assert resolve_modality(scan) == expected
    assert f"treated as {expected}" in caplog.text


def test_per_item_modality_and_restoration_to_input_units():
    data = {"image": _image([[[[40.0, 80.0, 120.0]]]]), "modality": "MR"}
    scaled = ModalityIntensityd("image", modality="CT")(data)
    torch.testing.assert_close(scaled["image"].as_tensor(), torch.tensor([[[[0.0, 0.5, 1.0]]]]))
    scaled["restored"] = scaled["image"].clone()
    restored = RestoreIntensityd("restored", source_key="image")(scaled)["restored"]
    torch.testing.assert_close(restored.as_tensor(), torch.tensor([[[[40.0, 80.0, 120.0]]]]))


def test_an_empty_per_item_modality_falls_back_to_the_given_one():
    """A table's empty modality cell: the item keeps the key (so a batch collates) and uses ``modality``."""
    data = {"image": _image([[[[40.0, 80.0, 120.0]]]]), "modality": ""}
    scaled = ModalityIntensityd("image", modality="MR")(data)
    torch.testing.assert_close(scaled["image"].as_tensor(), torch.tensor([[[[0.0, 0.5, 1.0]]]]))
