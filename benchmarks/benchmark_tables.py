"""What the benchmark scripts share (imported by the scripts beside them): result rows and large test scans."""

from __future__ import annotations

import csv
from pathlib import Path


def write_rows(rows: list[dict], path: Path) -> None:
    """``rows`` (dicts with the same keys) as a CSV with a header, columns in the first row's order."""
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_resampled_ct(path: Path, shape: tuple[int, int, int]) -> Path:
    """The embedded real head CT resampled (trilinear) to ``shape`` voxels over the same extent, as int16 HU NIfTI."""
    import nibabel as nib
    import numpy as np
    from monai.transforms import Resize

    import medfm

    source = nib.load(medfm.samples.path("ct_head"))
    volume = Resize(shape, mode="trilinear")(np.asarray(source.dataobj, dtype=np.float32)[None])[0]
    extent = np.asarray(source.shape) * np.asarray(source.header.get_zooms()[:3])
    affine = np.diag([*(extent / np.asarray(shape)), 1.0])
    nib.save(nib.Nifti1Image(np.asarray(volume).round().astype(np.int16), affine), path)
    return path
