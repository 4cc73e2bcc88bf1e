"""SPAD-ViT transforms: the voxel spacing it adapts to, and spacing-aware resampling to a token budget."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import DivisiblePad, MapTransform, Spacing, Transform

from ..networks.spad_vit import TWO_D_ANISO_D, aniso_d_from_spacing, depth_stride

__all__ = ["voxel_spacing", "image_aniso_d", "SpadResample", "SpadResampled"]

PATCH_SIZE = 16


def voxel_spacing(image: torch.Tensor) -> torch.Tensor:
    """``(x, y, z)`` voxel size in mm from a MetaTensor's affine: ``(3,)``, or ``(N, 3)`` for a batch."""
    if not isinstance(image, MetaTensor):
        raise ValueError("SPAD-ViT needs the voxel spacing: give a MetaTensor (as MONAI's loaders return)")
    return torch.linalg.vector_norm(torch.as_tensor(image.affine, dtype=torch.float64)[..., :3, :3], dim=-2)


def image_aniso_d(image: torch.Tensor) -> int:
    """aniso_d of one channel-first image ``(C, H, W, D)`` (a single slice: the 2D value, 5)."""
    if image.shape[-1] == 1:
        return TWO_D_ANISO_D
    return aniso_d_from_spacing(voxel_spacing(image).tolist())


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
