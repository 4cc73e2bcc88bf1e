"""SPAD-ViT transforms: spacing-aware resampling to a token budget, and MIM token masks."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import DivisiblePad, MapTransform, Randomizable, Spacing, Transform

from ..networks.spad_vit import TWO_D_ANISO_D, aniso_d_from_spacing, depth_stride
from .wrapping import SeedsWrappedTransform

__all__ = ["voxel_spacing", "image_aniso_d", "token_grid", "SpadResample", "SpadResampled", "RandTokenMask", "RandTokenMaskd"]

PATCH_SIZE = 16


def voxel_spacing(image: torch.Tensor) -> torch.Tensor:
    """``(x, y, z)`` voxel size in mm from a MetaTensor's affine: ``(3,)``, or ``(N, 3)`` for a batch."""
    if not isinstance(image, MetaTensor):
        raise ValueError("SPAD-ViT needs the voxel spacing: give a MetaTensor (as MONAI's loaders return)")
    return affine_to_spacing(image.affine, r=3).to(torch.float64)


def image_aniso_d(image: torch.Tensor) -> int:
    """aniso_d of one channel-first image ``(C, H, W, D)`` (a single slice: the 2D value, 5)."""
    if image.shape[-1] == 1:
        return TWO_D_ANISO_D
    return aniso_d_from_spacing(voxel_spacing(image).tolist())


def token_grid(image: torch.Tensor, patch_size: int = PATCH_SIZE) -> tuple[int, int, int]:
    """SPAD-ViT's ``(d, h, w)`` token grid for a channel-first image ``(C, H, W, D)``."""
    stride = depth_stride(image_aniso_d(image), patch_size)
    h, w, d = image.shape[1:]
    return d // stride, h // patch_size, w // patch_size


class SpadResample(Transform):
    """Resample a channel-first volume for SPAD-ViT and pad it to whole tokens.

    In-plane, the voxel size grows (both axes alike) until the larger in-plane side fits
    ``max_in_plane`` voxels, which bounds the token count; through-plane, slices are kept unless
    they are finer than the new in-plane voxel (then resampled to it), so thick-slice scans keep
    their native slices and the network's depth stride (aniso_d) absorbs the anisotropy. The
    result is zero-padded (after ``[0, 1]`` scaling: background) to multiples of
    ``(16, 16, depth stride)``. Single slices stay single slices.
    """

    def __init__(self, max_in_plane: int = 256, patch_size: int = PATCH_SIZE, mode: str = "bilinear") -> None:
        self.max_in_plane = max_in_plane
        self.patch_size = patch_size
        self.mode = mode

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        sx, sy, sz = voxel_spacing(image).tolist()
        h, w, d = image.shape[1:]
        scale = max(1.0, max(h, w) / self.max_in_plane)
        plane = (sx * scale, sy * scale)
        depth = sz if d == 1 else max(sz, min(plane))
        if (scale, depth) != (1.0, sz):
            image = Spacing(pixdim=(*plane, depth), mode=self.mode, padding_mode="zeros")(image)
        stride = depth_stride(image_aniso_d(image), self.patch_size)
        return DivisiblePad(k=(self.patch_size, self.patch_size, stride), mode="constant")(image)


class SpadResampled(MapTransform):
    """Dictionary version of :class:`SpadResample`."""

    def __init__(self, keys: KeysCollection, max_in_plane: int = 256, patch_size: int = PATCH_SIZE, mode: str = "bilinear",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.resample = SpadResample(max_in_plane, patch_size, mode)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resample(d[key])
        return d


class RandTokenMask(Randomizable, Transform):
    """A random MIM mask over SPAD-ViT's tokens of one image: ``(L,)`` bool, exactly
    ``round(ratio * L)`` True (at least one), L from :func:`token_grid` (PUMIT: ratio 0.55)."""

    def __init__(self, ratio: float = 0.55, patch_size: int = PATCH_SIZE) -> None:
        if not 0 < ratio < 1:
            raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
        self.ratio = ratio
        self.patch_size = patch_size
        self._order: np.ndarray | None = None

    def randomize(self, tokens: int) -> None:
        self._order = self.R.permutation(tokens)

    def __call__(self, image: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        tokens = math.prod(token_grid(image, self.patch_size))
        if randomize or self._order is None or len(self._order) != tokens:
            self.randomize(tokens)
        mask = torch.zeros(tokens, dtype=torch.bool)
        mask[torch.as_tensor(self._order[: max(1, round(self.ratio * tokens))])] = True
        return mask


class RandTokenMaskd(SeedsWrappedTransform, MapTransform):
    """Dictionary version of :class:`RandTokenMask`: reads ``keys`` (one image), writes ``mask_key``."""

    def __init__(self, keys: KeysCollection, mask_key: str = "token_mask", ratio: float = 0.55,
                 patch_size: int = PATCH_SIZE) -> None:
        MapTransform.__init__(self, keys)
        if len(self.keys) != 1:
            raise ValueError("RandTokenMaskd takes one image key")
        self.mask_key = mask_key
        self.transform = RandTokenMask(ratio, patch_size)

    def randomize(self, data=None) -> None:
        pass

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.mask_key] = self.transform(d[key])
        return d
