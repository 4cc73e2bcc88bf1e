import logging

import pytest
import torch
from monai.data import MetaTensor

from medfm.io import ScanError
from medfm.transforms import CheckInputContractd, contract_deviations, read_contract
from tests.conftest import GENESIS

CONTRACT = read_contract(GENESIS)


def _image(values, spacing=(0.7, 0.7, 1.25), meta=None):
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    return MetaTensor(torch.as_tensor(values, dtype=torch.float32), affine=affine,
                      meta={"filename_or_obj": "/data/scan.nii.gz", **(meta or {})})


def test_the_genesis_contract_is_declared_in_its_metadata():
    assert CONTRACT["modality"] == "CT" and CONTRACT["channels"] == 1 and CONTRACT["divisible_by"] == 8
    assert CONTRACT["intensity"] == {"method": "hu_window", "window": [-1000, 1000], "output_range": [0, 1]}


def test_chest_ct_at_native_spacing_fits():
    assert contract_deviations(_image(torch.linspace(-1024, 900, 64).reshape(1, 4, 4, 4)), CONTRACT) == []


def test_mri_is_reported_from_its_dicom_tag_or_its_intensities():
    mr = contract_deviations(_image(torch.rand(1, 4, 4, 4), meta={"Modality": "MR"}), CONTRACT)
    assert mr == ["DICOM modality MR, model pre-trained on CT"]
    [heuristic] = contract_deviations(_image(torch.arange(64.0).reshape(1, 4, 4, 4)), CONTRACT)
    assert heuristic.startswith("intensities 0 to 63 have no negative values, so they are not CT Hounsfield units")


def test_spacing_outside_the_pretraining_range_is_reported():
    [message] = contract_deviations(_image(torch.linspace(-900, 500, 64).reshape(1, 4, 4, 4), spacing=(0.7, 0.7, 5.0)), CONTRACT)
    assert message == ("voxel spacing 0.7 x 0.7 x 5 mm is outside the pre-training range "
                       "(0.4-1 x 0.4-1 x 0.5-2.5 mm, LUNA16 chest CT at native spacing)")


def test_warnings_are_logged_with_the_input_and_a_wrong_channel_count_is_an_error(caplog):
    check = CheckInputContractd("image", CONTRACT)
    with caplog.at_level(logging.WARNING, logger="medfm.contract"):
        out = check({"image": _image(torch.rand(1, 4, 4, 4), meta={"Modality": "MR"})})
    assert caplog.messages == ["/data/scan.nii.gz: DICOM modality MR, model pre-trained on CT"]
    assert out["image"].shape == (1, 4, 4, 4)
    with pytest.raises(ScanError, match=r"/data/scan.nii.gz: has 2 channel\(s\), the model takes 1"):
        check({"image": _image(torch.zeros(2, 4, 4, 4))})


def test_a_volume_off_the_model_grid_is_reported_with_the_grid_note():
    contract = {"modality": "MR", "grid_shape": [193, 229, 193], "grid_note": "MNI152 1 mm"}
    assert contract_deviations(torch.rand(1, 193, 229, 193), contract) == []
    (message,) = contract_deviations(torch.rand(1, 181, 217, 181), contract)
    assert message.startswith("voxel grid 181 x 217 x 181 is not the model grid 193 x 229 x 193 (MNI152 1 mm)")


def test_a_constant_volume_is_reported():
    (message,) = contract_deviations(_image(torch.full((1, 4, 4, 4), -1000.0)), CONTRACT)
    assert message == "every voxel is -1000 (a constant volume): the embedding describes no anatomy"
