"""The bad-input corpus: each case builds a broken input from real data and gives the expected message.

Used by the reader tests (``LoadScan`` raises ``ScanError``) and the CLI tests (``medfm infer``
prints the same message as its one error line).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.data import get_testdata_file

import medfm


def ct_series(small_ct: Path, tmp_path: Path) -> list[Path]:
    """A real CT crop (64x48x40) written as a 40-file DICOM series in ``tmp_path/series``, files in slice order."""
    return medfm.samples.write_dicom_series(str(small_ct), tmp_path / "series", modality="CT")


def _edit(path: Path, **changes) -> None:
    dataset = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(dataset, keyword, value)
    dataset.save_as(path)


def _shift(path: Path, dx: float = 0.0, dy: float = 0.0, dz: float = 0.0) -> None:
    x, y, z = (float(v) for v in pydicom.dcmread(path).ImagePositionPatient)
    _edit(path, ImagePositionPatient=[x + dx, y + dy, z + dz])


def duplicated_slice(small_ct, tmp_path, real_file):
    files = ct_series(small_ct, tmp_path)
    dataset = pydicom.dcmread(files[5])
    dataset.SOPInstanceUID = pydicom.uid.generate_uid()
    dataset.save_as(files[0].parent / "slice_dup.dcm")
    return files[0].parent, r"series: 1 duplicated slice position\(s\)"


def missing_slices(small_ct, tmp_path, real_file):
    files = ct_series(small_ct, tmp_path)
    for path in files[10:12]:
        path.unlink()
    return files[0].parent, r"series: 2 missing slice\(s\): gaps of up to 6 mm where the spacing is 2 mm"


def non_uniform_spacing(small_ct, tmp_path, real_file):
    files = ct_series(small_ct, tmp_path)
    _shift(files[7], dz=0.6)
    return files[0].parent, r"series: non-uniform slice spacing \(1\.4 to 2\.6 mm\)"


def gantry_tilt(small_ct, tmp_path, real_file):
    files = ct_series(small_ct, tmp_path)
    for index, path in enumerate(files):
        _shift(path, dy=0.35 * index)
    return files[0].parent, r"series: gantry tilt of about 9\.9 degrees"


def mixed_orientations(small_ct, tmp_path, real_file):
    files = ct_series(small_ct, tmp_path)
    _edit(files[3], ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    return files[0].parent, r"series: mixes 2 slice orientations"


def enhanced_mr_mixed_orientations(small_ct, tmp_path, real_file):
    path = real_file("enhanced_mr_mixed_orientations")
    return path, rf"{path.name}: mixes 3 slice orientations"


def multiframe_without_geometry(small_ct, tmp_path, real_file):
    return Path(get_testdata_file("emri_small.dcm")), (r"emri_small\.dcm: multi-frame file without plane position, "
                                                      r"orientation or pixel spacing for its 10 frames")


def single_dicom_slice(small_ct, tmp_path, real_file):
    return Path(get_testdata_file("CT_small.dcm")), (r"CT_small\.dcm: is a single 2D DICOM slice \(128x128\); "
                                                    r"give the folder")


def two_dimensional(small_ct, tmp_path, real_file):
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(nib.load(small_ct).dataobj)[:, :, 20:21], nib.load(small_ct).affine), path)
    return path, r"slice\.nii\.gz: is a 2D image \(shape \(64, 48, 1\)\); this model needs a 3D volume"


def four_dimensional(small_ct, tmp_path, real_file):
    volume = np.asarray(nib.load(small_ct).dataobj)
    path = tmp_path / "timeseries.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([volume, volume, volume], axis=-1), nib.load(small_ct).affine), path)
    return path, r"timeseries\.nii\.gz: has 4 dimensions \(shape \(64, 48, 40, 3\)\)"


def non_finite(small_ct, tmp_path, real_file):
    volume = np.asarray(nib.load(small_ct).dataobj).astype(np.float32)
    volume[0, 0, :3] = np.nan
    volume[1, 1, 1] = np.inf
    path = tmp_path / "holes.nii.gz"
    nib.save(nib.Nifti1Image(volume, nib.load(small_ct).affine), path)
    return path, r"holes\.nii\.gz: contains 4 NaN or infinite voxel\(s\)"


def not_an_image(small_ct, tmp_path, real_file):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"this is not an image")
    return path, r"broken\.nii\.gz: cannot be read as an image"


def folder_without_dicom(small_ct, tmp_path, real_file):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    return folder, r"notes: no DICOM files found in the folder"


def named_pipe(small_ct, tmp_path, real_file):
    path = tmp_path / "pipe.nii.gz"
    os.mkfifo(path)  # nothing ever writes to it: opening it for reading would block forever
    return path, r"pipe\.nii\.gz: not a regular file or folder \(a pipe, socket or device cannot be read as a scan\)"


def zip_with_an_escaping_member(small_ct, tmp_path, real_file):
    path = tmp_path / "series.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("../outside.dcm", b"x")
    return path, r"series\.zip: refused: archive member '\.\./outside\.dcm' would be written outside the extraction folder"


CORPUS: dict[str, Callable] = {case.__name__: case for case in (
    duplicated_slice, missing_slices, non_uniform_spacing, gantry_tilt, mixed_orientations,
    enhanced_mr_mixed_orientations, multiframe_without_geometry, single_dicom_slice, two_dimensional,
    four_dimensional, non_finite, not_an_image, folder_without_dicom, named_pipe, zip_with_an_escaping_member)}
