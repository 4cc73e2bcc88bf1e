import pytest
import torch
from monai.data import MetaTensor

from medfm.transforms import SpadResample, SpadResampled, image_aniso_d, voxel_spacing


def volume(shape, spacing) -> MetaTensor:
    return MetaTensor(torch.rand(1, *shape), affine=torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64)))


def test_voxel_spacing_of_one_image_and_of_a_batch():
    image = volume((8, 8, 4), (0.7, 0.8, 5.0))
    torch.testing.assert_close(voxel_spacing(image), torch.tensor([0.7, 0.8, 5.0], dtype=torch.float64))
    batch = MetaTensor(torch.rand(2, 1, 8, 8, 4), affine=torch.stack([image.affine, image.affine * 2]))
    assert voxel_spacing(batch).shape == (2, 3)
    with pytest.raises(ValueError, match="MetaTensor"):
        voxel_spacing(torch.rand(1, 8, 8, 4))


def test_a_thick_slice_ct_keeps_its_slices_and_fits_the_in_plane_budget():
    out = SpadResample(max_in_plane=256)(volume((512, 512, 100), (0.7, 0.7, 5.0)))
    assert out.shape == (1, 256, 256, 104)  # 100 slices padded to a multiple of the depth stride 8
    torch.testing.assert_close(voxel_spacing(out), torch.tensor([1.4, 1.4, 5.0], dtype=torch.float64))
    assert image_aniso_d(out) == 1


def test_fine_slices_are_resampled_to_the_in_plane_voxel_and_small_images_are_only_padded():
    out = SpadResample(max_in_plane=64)(volume((128, 96, 40), (0.5, 0.5, 0.3)))
    torch.testing.assert_close(voxel_spacing(out), torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    assert out.shape == (1, 64, 48, 16) and image_aniso_d(out) == 0  # 12 mm of 1 mm slices padded to 16
    small = SpadResampled("image", max_in_plane=256)({"image": volume((40, 50, 1), (0.3, 0.3, 1.0))})["image"]
    assert small.shape == (1, 48, 64, 1) and image_aniso_d(small) == 5  # one slice stays a 2D image
