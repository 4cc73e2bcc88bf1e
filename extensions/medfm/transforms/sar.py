"""Multi-scale crops for scale-aware restoration pre-training (Universal Model / SAR)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data.meta_obj import get_track_meta
from monai.transforms import MapTransform, Randomizable, Transform
from monai.transforms.traits import MultiSampleTrait
from monai.utils import convert_to_tensor

from .wrapping import SeedsWrappedTransform

__all__ = ["RandMultiScaleCrop", "RandMultiScaleCropd"]


class RandMultiScaleCrop(Randomizable, Transform, MultiSampleTrait):
    """Random crops at several sizes, each resized to one output size; the size index is the label.

    Args:
        crop_sizes: one (X, Y, Z) crop size in voxels per scale, smallest first. On volumes
            resampled to a common spacing these are physical sizes, which makes the scale label
            mean the same for every source.
        output_size: the network input size every crop is resized to (trilinear).
        num_samples: crops per call; each draws its scale uniformly.

    ``__call__(image)`` with ``image`` (C, X, Y, Z) returns ``num_samples`` pairs
    ``(crop (C, *output_size) float tensor, scale index)``; crops are MetaTensors while MONAI's
    meta tracking is on, without the input's spatial metadata (they are resized pieces). Volumes smaller than a crop are
    zero-padded (0 is background after :class:`ModalityIntensity`).
    """

    def __init__(self, crop_sizes: Sequence[Sequence[int]], output_size: Sequence[int], num_samples: int = 1) -> None:
        self.crop_sizes = [tuple(int(s) for s in size) for size in crop_sizes]
        self.output_size = tuple(int(s) for s in output_size)
        if not self.crop_sizes or any(len(size) != len(self.output_size) for size in self.crop_sizes):
            raise ValueError("crop_sizes must list at least one size with as many axes as output_size")
        self.num_samples = int(num_samples)
        self._draws: list[tuple[int, tuple[float, ...]]] = []

    def randomize(self, data=None) -> None:
        # a scale index and a relative corner position per sample; the corner is scaled to the
        # volume once its shape is known, so one seed gives the same crops on any volume size
        self._draws = [(int(self.R.randint(len(self.crop_sizes))), tuple(self.R.uniform(size=len(self.output_size))))
                       for _ in range(self.num_samples)]

    def __call__(self, image: torch.Tensor, randomize: bool = True) -> list[tuple[torch.Tensor, int]]:
        if randomize:
            self.randomize()
        volume = torch.as_tensor(image).float()
        largest = np.max(self.crop_sizes, axis=0)
        padding = [max(0, int(size) - extent) for size, extent in zip(largest, volume.shape[1:])]
        if any(padding):
            volume = F.pad(volume, [p for amount in reversed(padding) for p in (amount // 2, amount - amount // 2)])
        crops = []
        for scale, corner in self._draws:
            size = self.crop_sizes[scale]
            start = [int(round(c * (extent - s))) for c, extent, s in zip(corner, volume.shape[1:], size)]
            window = volume[(slice(None), *(slice(b, b + s) for b, s in zip(start, size)))]
            if size != self.output_size:
                window = F.interpolate(window[None], size=self.output_size, mode="trilinear", align_corners=False)[0]
            # MONAI's own croppers return MetaTensors while meta tracking is on; doing the same
            # keeps every crop of a batch one type for collation
            crops.append((convert_to_tensor(window.contiguous(), track_meta=get_track_meta()), scale))
        return crops


class RandMultiScaleCropd(SeedsWrappedTransform, MapTransform, MultiSampleTrait):
    """Dictionary version: one item per crop, the scale index under ``scale_key``; other entries are shared."""

    def __init__(self, keys: KeysCollection, crop_sizes: Sequence[Sequence[int]], output_size: Sequence[int],
                 num_samples: int = 1, scale_key: str = "scale", allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.transform = RandMultiScaleCrop(crop_sizes, output_size, num_samples)
        self.scale_key = scale_key

    def randomize(self, data=None) -> None:
        self.transform.randomize()

    def __call__(self, data: Mapping[Hashable, object]) -> list[dict[Hashable, object]]:
        self.randomize()
        items = [dict(data) for _ in range(self.transform.num_samples)]
        for key in self.key_iterator(dict(data)):
            for item, (crop, scale) in zip(items, self.transform(data[key], randomize=False)):
                item[key] = crop
                item[self.scale_key] = scale
        return items
