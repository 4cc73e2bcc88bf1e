import numpy as np
import pytest
import torch

from medfm.transforms import RandMultiScaleCrop, RandMultiScaleCropd

SIZES = [[4, 4, 2], [8, 8, 4], [12, 12, 6]]


def test_crops_have_the_output_size_and_a_scale_label():
    cropper = RandMultiScaleCrop(SIZES, [8, 8, 4], num_samples=30).set_random_state(0)
    crops = cropper(torch.rand(1, 20, 18, 10))
    assert len(crops) == 30 and all(c.shape == (1, 8, 8, 4) for c, _ in crops)
    assert {s for _, s in crops} == {0, 1, 2}


def test_the_native_scale_crop_is_an_unresized_window_of_the_input():
    volume = torch.arange(20 * 18 * 10, dtype=torch.float32).reshape(1, 20, 18, 10)
    cropper = RandMultiScaleCrop([[8, 8, 4]], [8, 8, 4], num_samples=5).set_random_state(3)
    for crop, scale in cropper(volume):
        first = int(crop[0, 0, 0, 0])
        i, j, k = np.unravel_index(first, (20, 18, 10))
        torch.testing.assert_close(crop, volume[:, i:i + 8, j:j + 8, k:k + 4])
        assert scale == 0


def test_larger_scales_cover_more_of_the_volume():
    """A crop at 12 voxels resized to 8 spans more input values than a native 8-voxel crop."""
    volume = torch.linspace(0, 1, 40)[:, None, None].expand(40, 16, 8)[None].contiguous()
    cropper = RandMultiScaleCrop(SIZES, [8, 8, 4], num_samples=60).set_random_state(1)
    spans = {0: [], 1: [], 2: []}
    for crop, scale in cropper(volume):
        spans[scale].append(float(crop.max() - crop.min()))
    assert np.mean(spans[0]) < np.mean(spans[1]) < np.mean(spans[2])


def test_small_volumes_are_padded_and_seeds_reproduce():
    small = torch.rand(1, 5, 5, 3)
    first = RandMultiScaleCrop(SIZES, [8, 8, 4], num_samples=4).set_random_state(7)(small)
    second = RandMultiScaleCrop(SIZES, [8, 8, 4], num_samples=4).set_random_state(7)(small)
    for (a, sa), (b, sb) in zip(first, second):
        torch.testing.assert_close(a, b)
        assert sa == sb


def test_dictionary_version_crops_all_keys_alike_and_keeps_other_entries():
    volume = torch.rand(1, 20, 18, 10)
    items = RandMultiScaleCropd(["image", "copy"], SIZES, [8, 8, 4], num_samples=6).set_random_state(0)(
        {"image": volume, "copy": volume.clone(), "domain": 1})
    assert len(items) == 6
    for item in items:
        torch.testing.assert_close(item["image"], item["copy"])
        assert item["domain"] == 1 and item["scale"] in (0, 1, 2)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="crop_sizes must list"):
        RandMultiScaleCrop([[4, 4]], [8, 8, 4])
