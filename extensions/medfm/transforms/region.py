"""Crops of a model's input size centred on a point given in world coordinates (regions of interest)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

__all__ = ["CropAtWorldPoint", "CropAtWorldPointd", "PointOutsideScanError", "lps_to_voxel", "voxel_to_lps"]

#: LPS (DICOM) and RAS (MONAI's affines) differ in the sign of x and y.
_LPS_RAS = np.diag([-1.0, -1.0, 1.0])


class PointOutsideScanError(ValueError):
    """A point that does not lie inside the scan: cropping there would embed padding only."""


def lps_to_voxel(affine, point_lps: Sequence[float]) -> np.ndarray:
    """Continuous voxel index ``(3,)`` of a world point in mm (LPS), for a MONAI (RAS) ``affine``."""
    ras = _LPS_RAS @ np.asarray(point_lps, dtype=np.float64)
    return (np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.append(ras, 1.0))[:3]


def voxel_to_lps(affine, voxel: Sequence[float]) -> np.ndarray:
    """World point in mm (LPS) of a continuous voxel index, for a MONAI (RAS) ``affine``."""
    return _LPS_RAS @ (np.asarray(affine, dtype=np.float64) @ np.append(np.asarray(voxel, dtype=np.float64), 1.0))[:3]


#: Half-voxel ties closer than this are treated as ties (the same scan read from two formats can differ at 1e-6).
_TIE_TOLERANCE = 1e-3


def _crop_start(voxel: np.ndarray, roi_size: Sequence[int], affine) -> list[int]:
    """First voxel of a ``roi_size`` crop centred on ``voxel``, the same anatomy in every orientation.

    The crop's centre is rounded to the nearest voxel grid position. A tie (the point half a voxel
    off that grid, as a label centroid often is) goes to the lower LPS coordinate along that axis's
    world direction, so a flipped read of the same scan picks the same voxels.
    """
    lps_axes = _LPS_RAS @ np.asarray(affine, dtype=np.float64)[:3, :3]
    start = []
    for axis, (v, size) in enumerate(zip(voxel, roi_size)):
        first = v - (size - 1) / 2
        if abs(first - np.floor(first) - 0.5) < _TIE_TOLERANCE:
            direction = lps_axes[:, axis][np.argmax(np.abs(lps_axes[:, axis]))]
            start.append(int(np.floor(first)) if direction > 0 else int(np.ceil(first)))
        else:
            start.append(int(np.round(first)))
    return start


class CropAtWorldPoint(Transform):
    """Crop ``roi_size`` voxels of a channel-first MetaTensor ``(C, H, W, D)`` centred on a world point.

    The point is in mm in the DICOM patient convention (LPS), so it names the same anatomy whatever
    the file format and the orientation the image was brought to. The crop starts at
    ``v - (roi_size - 1) / 2`` rounded, for the point's continuous voxel index ``v`` (half-voxel ties
    towards lower LPS coordinates, whatever the orientation): a point at the geometric centre of a
    crop of a file gives exactly that crop. Near a border the crop is padded
    with the image's minimum (background after intensity scaling); a point outside the scan (more
    than half a voxel beyond its edge) is a :class:`PointOutsideScanError`. The crop's affine is
    moved to its first voxel, and ``meta["region_center_lps"]`` holds the world centre of the crop.
    """

    def __init__(self, roi_size: Sequence[int]) -> None:
        self.roi_size = [int(n) for n in roi_size]

    def __call__(self, img: MetaTensor, point_lps: Sequence[float]) -> MetaTensor:
        if not isinstance(img, MetaTensor):
            raise ValueError("CropAtWorldPoint needs a MetaTensor (its affine places the point)")
        shape = img.shape[1:]
        if len(shape) != len(self.roi_size):
            raise ValueError(f"roi_size {self.roi_size} does not match the image's spatial shape {tuple(shape)}")
        voxel = lps_to_voxel(img.affine, point_lps)
        if np.any(voxel < -0.5) or np.any(voxel > np.asarray(shape) - 0.5):
            raise PointOutsideScanError(
                f"point ({', '.join(f'{c:g}' for c in point_lps)}) mm (LPS) lies outside the scan: voxel "
                f"({', '.join(f'{c:.1f}' for c in voxel)}) of a {' x '.join(map(str, shape))} grid")
        start = _crop_start(voxel, self.roi_size, img.affine)
        before = [max(0, -s) for s in start]
        after = [max(0, s + size - n) for s, size, n in zip(start, self.roi_size, shape)]
        data = img.as_tensor()
        if any(before) or any(after):
            pad = [amount for axis in reversed(range(len(shape))) for amount in (before[axis], after[axis])]
            data = F.pad(data, pad, value=float(data.min()))
        window = tuple(slice(s + b, s + b + size) for s, b, size in zip(start, before, self.roi_size))
        crop = data[(slice(None), *window)]
        affine = torch.as_tensor(img.affine, dtype=torch.float64).clone()
        affine[:3, 3] = affine[:3, :3] @ torch.as_tensor(start, dtype=torch.float64) + affine[:3, 3]
        center = voxel_to_lps(img.affine, [s + (size - 1) / 2 for s, size in zip(start, self.roi_size)])
        meta = {**{k: v for k, v in img.meta.items() if k != "affine"}, "region_center_lps": tuple(center.tolist())}
        return MetaTensor(crop.clone(), affine=affine, meta=meta)


class CropAtWorldPointd(MapTransform):
    """Dictionary version of :class:`CropAtWorldPoint`; the point (mm, LPS) is ``data[point_key]``."""

    def __init__(self, keys: KeysCollection, roi_size: Sequence[int], point_key: str = "center_lps",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.cropper = CropAtWorldPoint(roi_size)
        self.point_key = point_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.cropper(d[key], d[self.point_key])
        return d
