"""Brain MRI transforms: average pooling with geometry, slice masks, independent T1 augmentation."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medfm.transforms import AveragePool, AveragePoold, RandSliceMask, RandSliceMaskd, RandT1Augmentationd, slice_counts


def test_average_pool_averages_blocks_and_keeps_world_positions():
    affine = np.array([[1.0, 0, 0, -10], [0, 0, 1.5, 5], [0, -2.0, 0, 7], [0, 0, 0, 1]])
    image = MetaTensor(torch.rand(1, 9, 6, 4), affine=torch.as_tensor(affine))
    pooled = AveragePoold("image", factor=2)({"image": image})["image"]
    assert pooled.shape == (1, 4, 3, 2)  # remainders dropped
    torch.testing.assert_close(pooled[0, 1, 2, 1], image[0, 2:4, 4:6, 2:4].mean().as_tensor())
    corners = [affine @ np.array([i, j, k, 1.0]) for i in (2, 3) for j in (4, 5) for k in (2, 3)]
    np.testing.assert_allclose(np.asarray(pooled.affine) @ np.array([1, 2, 1, 1.0]), np.mean(corners, axis=0))
    assert isinstance(AveragePool()(torch.rand(1, 4, 4, 4)), torch.Tensor)
    with pytest.raises(ValueError, match="factor must be >= 1"):
        AveragePool(0)


def test_slice_masks_follow_the_view_order_and_ratio_and_are_reproducible():
    image = torch.zeros(1, 96, 114, 96)
    assert slice_counts(image.shape[1:]) == (96, 96, 114)
    mask = RandSliceMask(0.1).set_random_state(3)(image)
    axial, sagittal, coronal = mask.split([96, 96, 114])
    assert (int(axial.sum()), int(sagittal.sum()), int(coronal.sum())) == (9, 9, 11)
    again = RandSliceMaskd("image", ratio=0.1).set_random_state(3)({"image": image})["slice_mask"]
    assert torch.equal(mask, again)
    assert not torch.equal(mask, RandSliceMask(0.1).set_random_state(4)(image))
    with pytest.raises(ValueError, match="ratio must be in"):
        RandSliceMask(1.0)


def test_t1_augmentation_draws_independently_per_key_and_reproducibly():
    volume = torch.zeros(1, 24, 28, 20)
    volume[:, 6:18, 6:22, 5:15] = torch.linspace(0.2, 1.0, 10)
    augment = RandT1Augmentationd(["image", "positive"]).set_random_state(0)
    first = augment({"image": volume.clone(), "positive": volume.clone()})
    assert not torch.allclose(first["image"], first["positive"])  # anchor and positive differ
    for key in ("image", "positive"):
        assert float(first[key].min()) == 0.0 and float(first[key].max()) == pytest.approx(1.0)
    repeat = RandT1Augmentationd(["image", "positive"]).set_random_state(0)({"image": volume.clone(), "positive": volume.clone()})
    torch.testing.assert_close(first["image"], repeat["image"])
    torch.testing.assert_close(first["positive"], repeat["positive"])
