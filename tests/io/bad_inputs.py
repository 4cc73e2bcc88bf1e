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


def mixed_pixel_spacing(small_ct, tmp_path, real_file):
    files = ct_series(small_ct, tmp_path)
    spacing = [float(v) for v in pydicom.dcmread(files[0]).PixelSpacing]
    _edit(files[9], PixelSpacing=[spacing[0] * 1.25, spacing[1] * 1.25])
    return files[0].parent, r"series: slices have 2 different PixelSpacing values \(.* mm\); they are not one volume"


def missing_pixel_spacing(small_ct, tmp_path, real_file):
    files = ct_series(small_ct, tmp_path)
    dataset = pydicom.dcmread(files[0])
    del dataset.PixelSpacing
    dataset.save_as(files[0])
    return files[0].parent, r"series: 1 slice\(s\) without PixelSpacing; the voxel size is unknown"


def non_finite_position(small_ct, tmp_path, real_file):
    files = ct_series(small_ct, tmp_path)
    x, y, z = (float(v) for v in pydicom.dcmread(files[4]).ImagePositionPatient)
    _edit(files[4], ImagePositionPatient=[x, y, "NaN"])
    return files[0].parent, r"series: 1 slice\(s\) with a NaN or infinite ImagePositionPatient"


def degenerate_orientation(small_ct, tmp_path, real_file):
    files = ct_series(small_ct, tmp_path)
    for path in files:
        _edit(path, ImageOrientationPatient=[1, 0, 0, 1, 0, 0])
    return files[0].parent, r"series: ImageOrientationPatient \[1\.0, 0\.0, 0\.0, 1\.0, 0\.0, 0\.0\] is degenerate"


def non_unit_orientation(small_ct, tmp_path, real_file):
    files = ct_series(small_ct, tmp_path)
    for path in files:
        _edit(path, ImageOrientationPatient=[0.5, 0, 0, 0, 1, 0])
    return files[0].parent, r"series: ImageOrientationPatient direction cosines are not unit vectors \(lengths 0\.5 and 1\)"


def slice_of_another_size(small_ct, tmp_path, real_file):
    files = ct_series(small_ct, tmp_path)
    dataset = pydicom.dcmread(files[6])
    pixels = dataset.pixel_array[:-8, :-8].copy()
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.PixelData = pixels.tobytes()
    dataset.save_as(files[6])
    return files[0].parent, r"series: slices have 2 different sizes \(\d+x\d+, \d+x\d+\); they are not one volume"


def _nifti_with(small_ct, path, edit):
    """The real CT with ``edit`` applied to a copy of its header, saved with that header as it is (no affine given,
    so nibabel does not rewrite the forms)."""
    image = nib.load(small_ct)
    header = image.header.copy()
    edit(header)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), None, header), path)
    return path


def qform_sform_disagree(small_ct, tmp_path, real_file):
    def shift_sform(header):
        sform = header.get_best_affine()
        header.set_qform(sform, code=1)
        sform[:3, 3] += [12.0, 0.0, 0.0]
        header.set_sform(sform, code=2)
    path = _nifti_with(small_ct, tmp_path / "two_forms.nii.gz", shift_sform)
    return path, r"two_forms\.nii\.gz: its qform and sform disagree \(affine entries up to 12 apart\)"


def _patched_pixdim(small_ct, path, axis, value):
    """An uncompressed copy of the real CT with pixdim[axis] overwritten in the file's bytes (nibabel would
    correct the header on save)."""
    image = nib.load(small_ct)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine), path)
    data = bytearray(path.read_bytes())
    data[76 + 4 * axis:80 + 4 * axis] = np.float32(value).tobytes()  # pixdim: 8 float32 at byte 76
    path.write_bytes(bytes(data))
    return path


def zero_voxel_size(small_ct, tmp_path, real_file):
    path = _patched_pixdim(small_ct, tmp_path / "flat.nii", 2, 0.0)
    return path, r"flat\.nii: a voxel size \(pixdim\) is zero \(\[2\.0, 0\.0, 2\.0\]\)"


def negative_voxel_size(small_ct, tmp_path, real_file):
    path = _patched_pixdim(small_ct, tmp_path / "mirrored.nii", 1, -2.0)
    return path, r"mirrored\.nii: negative voxel size in pixdim \(\[-2\.0, 2\.0, 2\.0\]\)"


def complex_voxels(small_ct, tmp_path, real_file):
    image = nib.load(small_ct)
    path = tmp_path / "complex.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj).astype(np.complex64), image.affine), path)
    return path, r"complex\.nii\.gz: holds complex-valued voxels"


def rgb_voxels(small_ct, tmp_path, real_file):
    image = nib.load(small_ct)
    rgb = np.zeros(image.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = tmp_path / "colour.nii.gz"
    nib.save(nib.Nifti1Image(rgb, image.affine), path)
    return path, r"colour\.nii\.gz: holds RGB\(A\) voxels"


def empty_axis(small_ct, tmp_path, real_file):
    path = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 0, 40), np.int16), nib.load(small_ct).affine), path)
    return path, r"empty\.nii\.gz: has an empty axis \(shape \(64, 0, 40\)\); it holds no voxels"


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
    four_dimensional, non_finite, not_an_image, folder_without_dicom, named_pipe, zip_with_an_escaping_member,
    mixed_pixel_spacing, missing_pixel_spacing, non_finite_position, degenerate_orientation, non_unit_orientation,
    slice_of_another_size, qform_sform_disagree, zero_voxel_size, negative_voxel_size, complex_voxels, rgb_voxels,
    empty_axis)}
