import numpy as np
import pytest
import torch

from medfm.transforms import VariableDimensionTransform, VariableDimensionTransformd


def test_rgb_becomes_a_normalised_one_channel_three_slice_volume():
    image = torch.stack([torch.full((4, 5), v) for v in (0.0, 114.495, 255.0)])
    volume = VariableDimensionTransform(prob=0.0)(image)
    assert volume.shape == (1, 3, 4, 5) and volume.dtype == torch.float32
    torch.testing.assert_close(volume[0, :, 0, 0], torch.tensor([-114.495, 0.0, 140.505]) / 57.63)


def test_slice_order_is_shuffled_per_sample_and_seedable():
    image = torch.arange(3.0)[:, None, None].expand(3, 2, 2)
    transform = VariableDimensionTransform().set_random_state(0)
    orders = {tuple(np.rint(transform(image)[0, :, 0, 0].numpy() * 57.63 + 114.495).astype(int)) for _ in range(40)}
    assert len(orders) == 6  # every permutation of the three slices occurs
    again = VariableDimensionTransform().set_random_state(0)
    first = VariableDimensionTransform().set_random_state(0)
    torch.testing.assert_close(again(image), first(image))


def test_grayscale_fills_all_slices_and_bad_shapes_fail():
    volume = VariableDimensionTransform()(np.full((1, 3, 3), 114.495, np.float32))
    assert volume.shape == (1, 3, 3, 3) and float(volume.abs().max()) < 1e-5
    with pytest.raises(ValueError, match=r"expected a \(C, H, W\) image with 1 or 3 channels"):
        VariableDimensionTransform()(torch.zeros(4, 3, 3))


def test_dictionary_version_uses_one_order_for_all_keys():
    image = torch.arange(3.0)[:, None, None].expand(3, 2, 2)
    out = VariableDimensionTransformd(["a", "b"]).set_random_state(1)({"a": image, "b": image.clone(), "label": 7})
    torch.testing.assert_close(out["a"], out["b"])
    assert out["label"] == 7
