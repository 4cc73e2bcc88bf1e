"""Turning feature maps into per-volume embedding vectors."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends
from monai.utils.type_conversion import convert_to_tensor

__all__ = ["GlobalAveragePool", "GlobalAveragePoold"]


class GlobalAveragePool(Transform):
    """Average a channel-first feature map ``(C, *spatial)`` over its spatial axes to a ``(C,)`` vector.

    The result is a plain float32 tensor: an embedding has no spatial geometry to carry.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __call__(self, features) -> torch.Tensor:
        tensor = convert_to_tensor(features, track_meta=False, dtype=torch.float32)
        if tensor.dim() < 2:
            raise ValueError(f"expected a (C, *spatial) feature map, got shape {tuple(tensor.shape)}")
        return tensor.flatten(1).mean(dim=1)


class GlobalAveragePoold(MapTransform):
    """Dictionary version of :class:`GlobalAveragePool`."""

    backend = GlobalAveragePool.backend

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.pool = GlobalAveragePool()

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.pool(d[key])
        return d
