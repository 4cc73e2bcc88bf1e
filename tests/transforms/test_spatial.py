import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, Spacingd

from medfm.io import LoadScand
from medfm.transforms import ResampleToSpacingd


def test_resampling_keeps_monai_labels_string_entries_and_inverts(small_ct):
    # MONAI Label's request dict: the image's path under "image" and again, as a string, under "image_path"
    data = {"image": str(small_ct), "image_path": str(small_ct), "image_meta_dict": {"note": "kept"}}
    load = Compose([LoadScand(keys="image"), EnsureChannelFirstd(keys="image")])
    with pytest.raises(AttributeError, match="update"):  # the monai 1.6.1 behaviour this transform exists for
        Spacingd(keys="image", pixdim=(1.5, 1.5, 2.0))(load(data))
    pipeline = Compose([load, ResampleToSpacingd(keys="image", pixdim=(1.5, 1.5, 2.0))])
    out = pipeline(data)
    assert out["image_path"] == str(small_ct) and out["image_meta_dict"]["note"] == "kept"
    np.testing.assert_allclose(np.linalg.norm(out["image"].affine[:3, :3].numpy(), axis=0), (1.5, 1.5, 2.0), atol=1e-6)
    out["pred"] = out["image"].clone()
    restored = Invertd(keys="pred", transform=pipeline, orig_keys="image", nearest_interp=False)(out)["pred"]
    original = load(data)["image"]
    assert restored.shape == original.shape
    np.testing.assert_allclose(restored.affine, original.affine, atol=1e-5)


def test_resampling_a_plain_dictionary_matches_monai_spacingd():
    image = MetaTensor(torch.rand(1, 20, 16, 8), affine=torch.diag(torch.tensor([0.8, 0.8, 3.0, 1.0], dtype=torch.float64)))
    ours = ResampleToSpacingd(keys="image", pixdim=(1.6, 1.6, 3.0))({"image": image})["image"]
    monai = Spacingd(keys="image", pixdim=(1.6, 1.6, 3.0))({"image": image})["image"]
    torch.testing.assert_close(ours.as_tensor(), monai.as_tensor())
