import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medfm.transforms import CropAtWorldPoint, CropAtWorldPointd, PointOutsideScanError, lps_to_voxel, voxel_to_lps

AFFINE = torch.tensor([[-2.0, 0, 0, 10], [0, 1.5, 0, -20], [0, 0, 3, 5], [0, 0, 0, 1]], dtype=torch.float64)


def _image():
    return MetaTensor(torch.arange(20 * 16 * 10, dtype=torch.float32).reshape(1, 20, 16, 10), affine=AFFINE)


def test_lps_and_voxel_coordinates_invert_each_other():
    voxel = np.array([3.0, 7.5, 2.25])
    np.testing.assert_allclose(lps_to_voxel(AFFINE, voxel_to_lps(AFFINE, voxel)), voxel)
    np.testing.assert_allclose(voxel_to_lps(AFFINE, [0, 0, 0]), [-10, 20, 5])  # RAS (10, -20, 5)


def test_crop_centred_on_a_point_moves_the_affine_to_its_first_voxel():
    image = _image()
    crop = CropAtWorldPoint((8, 6, 4))(image, voxel_to_lps(AFFINE, [9.5, 7.5, 4.5]))
    assert crop.shape == (1, 8, 6, 4)
    torch.testing.assert_close(crop.as_tensor(), image.as_tensor()[:, 6:14, 5:11, 3:7])
    np.testing.assert_allclose(np.asarray(crop.affine)[:3, 3], (AFFINE @ torch.tensor([6.0, 5, 3, 1], dtype=torch.float64))[:3])
    np.testing.assert_allclose(crop.meta["region_center_lps"], voxel_to_lps(AFFINE, [9.5, 7.5, 4.5]))


def test_crop_near_a_border_is_padded_with_the_minimum():
    crop = CropAtWorldPointd("image", (8, 6, 4), point_key="point")({"image": _image() + 5,
                                                                      "point": voxel_to_lps(AFFINE, [0, 0, 0])})["image"]
    assert crop.shape == (1, 8, 6, 4)
    # ties (a voxel-centred point, even sizes) go to lower LPS coordinates: voxel x and z run towards +L and
    # +S (start rounded down: -4, -2), voxel y towards -P in LPS (start rounded up: -2); so the point's voxel,
    # the image's first, is crop voxel (4, 2, 2) and what comes before it is padding with the minimum
    assert float(crop[0, 0, 0, 0]) == 5.0 and float(crop[0, 4, 2, 2]) == 5.0 and float(crop[0, 3, 2, 2]) == 5.0
    assert float(crop[0, 5, 2, 2]) == float(_image()[0, 1, 0, 0] + 5)


@pytest.mark.parametrize("voxel, inside", [([-0.4, 0, 0], True), ([19.4, 15.4, 9.4], True), ([-0.6, 0, 0], False),
                                           ([0, 0, 9.6], False)])
def test_a_point_outside_the_scan_is_refused(voxel, inside):
    crop = CropAtWorldPoint((4, 4, 4))
    point = voxel_to_lps(AFFINE, voxel)
    if inside:
        assert crop(_image(), point).shape == (1, 4, 4, 4)
    else:
        with pytest.raises(PointOutsideScanError, match=r"mm \(LPS\) lies outside the scan"):
            crop(_image(), point)


def test_a_half_voxel_tie_picks_the_same_voxels_in_a_flipped_read():
    image = _image()
    flipped = MetaTensor(torch.flip(image.as_tensor(), dims=[1]), affine=AFFINE @ torch.tensor(
        [[-1.0, 0, 0, 19], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float64))
    point = voxel_to_lps(AFFINE, [9.0, 7.5, 4.0])  # a tie along x for an even crop size
    crop, crop_flipped = CropAtWorldPoint((6, 4, 4))(image, point), CropAtWorldPoint((6, 4, 4))(flipped, point)
    torch.testing.assert_close(crop.as_tensor(), torch.flip(crop_flipped.as_tensor(), dims=[1]))
    np.testing.assert_allclose(crop.meta["region_center_lps"], crop_flipped.meta["region_center_lps"])
