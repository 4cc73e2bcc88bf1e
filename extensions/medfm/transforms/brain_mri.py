"""Brain MRI transforms of the Medical Transformer: grid pooling, masked slices, T1 augmentation.

The model grid is the MNI152 1 mm grid (193 x 229 x 193, RAS) average-pooled by 2 to
96 x 114 x 96. Bundles get there with MONAI's ``Orientationd`` / ``Spacingd`` /
``ResizeWithPadOrCropd`` / ``ScaleIntensityd`` and :class:`AveragePoold`; registration to MNI is
not done here (the input contract warns when the grid does not match).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrast,
    RandAffine,
    RandBiasField,
    RandGaussianNoise,
    RandGaussianSmooth,
    Randomizable,
    ScaleIntensity,
    Transform,
)
from monai.utils import TransformBackends

from .wrapping import SeedsWrappedTransform

__all__ = ["AveragePool", "AveragePoold", "RandSliceMask", "RandSliceMaskd", "RandT1Augmentation",
           "RandT1Augmentationd", "slice_counts"]


class AveragePool(Transform):
    """Average-pool a channel-first image by an integer ``factor`` per spatial axis (remainders dropped).

    ``(C, X, Y, Z)`` -> ``(C, X // f, Y // f, Z // f)``; a MetaTensor's affine is updated so each
    new voxel sits at the centre of the voxels it averages (spacing times ``factor``).
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, factor: int = 2) -> None:
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.factor = int(factor)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        spatial = image.ndim - 1
        pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
        data = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
        pooled = pool(data[None].float(), self.factor)[0]
        if not isinstance(image, MetaTensor):
            return pooled
        affine = torch.as_tensor(image.affine, dtype=torch.float64).clone()
        half_step = torch.full((spatial,), (self.factor - 1) / 2.0, dtype=torch.float64)
        affine[:spatial, spatial] += affine[:spatial, :spatial] @ half_step
        affine[:spatial, :spatial] *= self.factor
        result = MetaTensor(pooled, meta=dict(image.meta))
        result.affine = affine
        return result


class AveragePoold(MapTransform):
    """Dictionary version of :class:`AveragePool`."""

    def __init__(self, keys: KeysCollection, factor: int = 2, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.pool = AveragePool(factor)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.pool(d[key])
        return d


def slice_counts(spatial_shape: Sequence[int]) -> tuple[int, int, int]:
    """Slices per view (axial, sagittal, coronal) of an ``(X, Y, Z)`` RAS volume: ``(Z, X, Y)``."""
    x, y, z = (int(n) for n in spatial_shape)
    return z, x, y


class RandSliceMask(Randomizable, Transform):
    """Choose the slices to mask for masked encoding-vector prediction.

    For a channel-first ``(C, X, Y, Z)`` image returns a bool tensor ``(Z + X + Y,)`` in the
    network's view order (axial, sagittal, coronal) with ``int(ratio * slices)`` slices drawn
    without replacement in each view (at least one).
    """

    def __init__(self, ratio: float = 0.1) -> None:
        if not 0 < ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {ratio}")
        self.ratio = ratio

    def randomize(self, data=None) -> None:  # drawing happens per call, in __call__
        pass

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        masks = []
        for count in slice_counts(image.shape[1:]):
            mask = torch.zeros(count, dtype=torch.bool)
            chosen = self.R.choice(count, size=max(1, int(self.ratio * count)), replace=False)
            mask[torch.as_tensor(chosen)] = True
            masks.append(mask)
        return torch.cat(masks)


class RandSliceMaskd(SeedsWrappedTransform, MapTransform):
    """Dictionary version of :class:`RandSliceMask`: reads ``key``'s shape, writes the mask to ``mask_key``."""

    def __init__(self, keys: KeysCollection, mask_key: str = "slice_mask", ratio: float = 0.1,
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError("RandSliceMaskd takes one image key")
        self.mask_key = mask_key
        self.transform = RandSliceMask(ratio)

    def randomize(self, data=None) -> None:
        pass

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.mask_key] = self.transform(d[key])
        return d


class RandT1Augmentation(SeedsWrappedTransform, Transform):
    """Strong spatial and intensity augmentation of a channel-first T1 volume in [0, 1].

    Spatial (probability ``spatial_prob``): rotation up to ``rotate_degrees`` about each axis,
    isotropic-ish scaling by up to ``scale``, translation up to ``translate`` voxels. Intensity:
    a smooth bias field (coefficients up to ``bias_field``), gamma contrast in ``gamma``, blur
    (sigma up to 1 voxel, p=0.3) and Gaussian noise (std ``noise_std``). The result is min-max
    rescaled to [0, 1], the range the model sees.
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, rotate_degrees: float = 10.0, scale: float = 0.1, translate: float = 4.0,
                 spatial_prob: float = 1.0, bias_field: float = 0.3, gamma: tuple[float, float] = (0.7, 1.5),
                 noise_std: float = 0.02) -> None:
        angle = float(np.deg2rad(rotate_degrees))
        self.transform = Compose([
            RandAffine(prob=spatial_prob, rotate_range=(angle, angle, angle), scale_range=(scale, scale, scale),
                       translate_range=(translate, translate, translate), padding_mode="zeros", mode="bilinear"),
            RandBiasField(prob=1.0, coeff_range=(0.0, bias_field)),
            RandAdjustContrast(prob=1.0, gamma=gamma),
            RandGaussianSmooth(prob=0.3, sigma_x=(0.0, 1.0), sigma_y=(0.0, 1.0), sigma_z=(0.0, 1.0)),
            RandGaussianNoise(prob=1.0, std=noise_std),
            ScaleIntensity(minv=0.0, maxv=1.0),
        ])

    def randomize(self, data=None) -> None:
        pass

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.transform(image)


class RandT1Augmentationd(SeedsWrappedTransform, MapTransform):
    """Dictionary version of :class:`RandT1Augmentation` with one independent draw per key.

    MONAI's dictionary transforms apply one draw to all their keys; the triplet stage needs the
    anchor and its positive (two keys holding the same volume) augmented differently.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **augmentation) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.transform = RandT1Augmentation(**augmentation)

    def randomize(self, data=None) -> None:
        pass

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d
