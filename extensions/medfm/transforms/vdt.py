"""Variable dimension transform: a 2D image read as a one-channel 3-slice volume (VDT pre-training)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_tensor

from .wrapping import SeedsWrappedTransform

__all__ = ["VariableDimensionTransform", "VariableDimensionTransformd", "VDT_MEAN", "VDT_STD"]

#: One normalisation shared by all slices, on the 0-255 scale (the paper's values).
VDT_MEAN = 114.495
VDT_STD = 57.63


class VariableDimensionTransform(RandomizableTransform):
    """(C, H, W) image on 0-255, C = 3 (RGB) or 1 -> (1, 3, H, W) float volume, slices first.

    Each colour channel becomes one slice (a grayscale image fills all three); with
    probability ``prob`` (upstream: always) the slice order is shuffled, so the network cannot
    rely on which colour sits where along depth. All slices share one normalisation,
    ``(x - 114.495) / 57.63``. The slice axis comes first to match the depth-keeping strides
    (1, 2, 2) of :func:`medfm.networks.vdt_resnet18` in pre-training geometry.
    """

    def __init__(self, prob: float = 1.0, mean: float = VDT_MEAN, std: float = VDT_STD) -> None:
        RandomizableTransform.__init__(self, prob)
        self.mean = mean
        self.std = std
        self._order = np.arange(3)

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self._order = self.R.permutation(3) if self._do_transform else np.arange(3)

    def __call__(self, image, randomize: bool = True) -> torch.Tensor:
        image = convert_to_tensor(image, track_meta=False).float()
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"expected a (C, H, W) image with 1 or 3 channels, got shape {tuple(image.shape)}")
        if randomize:
            self.randomize()
        slices = image.expand(3, -1, -1) if image.shape[0] == 1 else image[torch.as_tensor(self._order)]
        return ((slices - self.mean) / self.std)[None].contiguous()


class VariableDimensionTransformd(SeedsWrappedTransform, RandomizableTransform, MapTransform):
    """Dictionary version of :class:`VariableDimensionTransform` (one slice order per item)."""

    def __init__(self, keys: KeysCollection, prob: float = 1.0, mean: float = VDT_MEAN, std: float = VDT_STD,
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, 1.0)
        self.transform = VariableDimensionTransform(prob, mean, std)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        self.transform.randomize()
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key], randomize=False)
        return d
