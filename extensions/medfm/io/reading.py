"""Reading user scans: one entry point for files, DICOM folders and zipped DICOM series.

Every problem is reported as one :class:`ScanError` line that names the input and what is
wrong; problems that leave the geometry trustworthy are logged as warnings instead.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import torch
from monai.config import KeysCollection
from monai.data import ITKReader, MetaTensor, NibabelReader
from monai.transforms import LoadImage, MapTransform, Transform

from ..errors import MedfmError, first_line, innermost

__all__ = [
    "ScanError",
    "DicomSeries",
    "list_dicom_series",
    "safe_extract_zip",
    "LoadScan",
    "LoadScand",
    "MAX_INPUT_GIB_ENV",
]

logger = logging.getLogger(__name__)

#: Environment variable with the largest input (GiB of float32 voxels) medfm will load.
MAX_INPUT_GIB_ENV = "MEDFM_MAX_INPUT_GIB"
DEFAULT_MAX_INPUT_GIB = 8.0
#: Relative deviation of a slice gap from the median gap that still counts as uniform.
SPACING_TOLERANCE = 0.01


class ScanError(MedfmError):
    """An input scan that cannot be processed safely, explained in one line."""


@dataclass
class DicomSeries:
    """The files of one DICOM series and what a user needs to tell series apart."""

    uid: str
    description: str
    modality: str
    files: list[Path] = field(default_factory=list)
    headers: list = field(default_factory=list, repr=False)  # pydicom datasets without pixel data

    def summary(self) -> str:
        return f"{self.uid} ({self.modality or '?'}, {self.description or 'no description'!r}, {len(self.files)} files)"


def list_dicom_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """All DICOM series below ``folder`` (headers only; non-DICOM files are ignored)."""
    series: dict[str, DicomSeries] = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError):
            continue
        uid = str(header.get("SeriesInstanceUID", ""))
        if not uid:
            continue
        entry = series.setdefault(uid, DicomSeries(uid, str(header.get("SeriesDescription", "")), str(header.get("Modality", ""))))
        entry.files.append(path)
        entry.headers.append(header)
    return list(series.values())


def safe_extract_zip(archive: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Extract ``archive`` into ``target``, refusing members that would land outside it."""
    target = Path(target).resolve()
    with zipfile.ZipFile(archive) as bundle:
        for member in bundle.infolist():
            destination = (target / member.filename).resolve()
            if destination != target and target not in destination.parents:
                raise ScanError(f"{archive}: refused: archive member {member.filename!r} would be written outside the extraction folder")
            if (member.external_attr >> 16) & 0o170000 == 0o120000:
                raise ScanError(f"{archive}: refused: archive member {member.filename!r} is a symbolic link")
        bundle.extractall(target)
    return target


def _max_input_bytes(max_gib: float | None) -> tuple[float, int]:
    gib = max_gib if max_gib is not None else float(os.environ.get(MAX_INPUT_GIB_ENV, DEFAULT_MAX_INPUT_GIB))
    return gib, int(gib * 2**30)


class LoadScan(Transform):
    """Load one scan as a MetaTensor after checking that it is safe to process.

    Accepts a NIfTI file (read with nibabel), an NRRD/MHA file, a DICOM series folder or a
    ``.zip`` of a DICOM series (read with ITK). A
    folder with several series needs ``series_uid``; without it the error lists the series found.
    Before reading voxels it estimates the memory from the headers and refuses inputs above
    ``max_gib`` (default ``$MEDFM_MAX_INPUT_GIB`` or 8 GiB of float32). After reading it rejects
    2D images, 4D inputs and NaN/Inf voxels; DICOM series are checked for duplicated positions,
    missing slices or non-uniform spacing, mixed orientations and gantry tilt.

    Returns the array without a channel axis, in the file's own dtype, with the
    input path in ``meta["filename_or_obj"]`` and, for DICOM, ``meta["SeriesInstanceUID"]`` and
    ``meta["Modality"]``.
    """

    def __init__(self, series_uid: str | None = None, max_gib: float | None = None) -> None:
        self.series_uid = series_uid or None
        self.max_gib = max_gib

    def __call__(self, path: str | os.PathLike) -> MetaTensor:
        source = Path(path)
        if not source.exists():
            raise ScanError(f"{source}: no such file or folder")
        if source.is_file() and zipfile.is_zipfile(source):
            with tempfile.TemporaryDirectory(prefix="medfm-zip-") as folder:
                return self._load_folder(safe_extract_zip(source, folder), source)
        if source.is_dir():
            return self._load_folder(source, source)
        self._check_memory(source, self._file_voxels(source))
        return self._validated(self._read(str(source), source), source)

    def _read(self, target: str, source: Path, series_uid: str = "") -> MetaTensor:
        # ITK's NIfTI reader silently turns NaN and Inf into 0; nibabel, the reference
        # implementation, keeps them (and gives the same voxels and affine otherwise)
        nifti = target.lower().endswith((".nii", ".nii.gz"))
        reader = NibabelReader() if nifti else ITKReader(series_name=series_uid)
        try:
            # native dtype: a float32 copy of a large int16 series doubles memory and load time,
            # and the bundles' intensity scaling converts to float anyway
            image = LoadImage(reader=reader, image_only=True, dtype=None)(target)
        except Exception as error:
            raise ScanError(f"{source}: cannot be read as an image ({first_line(innermost(error))})") from None
        image.meta["filename_or_obj"] = str(source)
        return image

    def _load_folder(self, folder: Path, source: Path) -> MetaTensor:
        found = list_dicom_series(folder)
        if not found:
            raise ScanError(f"{source}: no DICOM files found in the folder")
        if self.series_uid is not None:
            chosen = [s for s in found if s.uid == self.series_uid]
            if not chosen:
                raise ScanError(f"{source}: no series {self.series_uid}; found: {'; '.join(s.summary() for s in found)}")
            series = chosen[0]
        elif len(found) > 1:
            raise ScanError(f"{source}: {len(found)} DICOM series, choose one with series_uid: "
                            f"{'; '.join(s.summary() for s in found)}")
        else:
            series = found[0]
        headers = series.headers
        self._check_series_geometry(headers, source)
        self._check_memory(source, int(headers[0].Rows) * int(headers[0].Columns) * len(headers))
        image = self._read(str(series.files[0].parent), source, series.uid)
        image.meta["SeriesInstanceUID"] = series.uid
        image.meta["Modality"] = series.modality
        return self._validated(image, source)

    @staticmethod
    def _file_voxels(source: Path) -> int | None:
        """Voxel count from the header alone (NIfTI via nibabel, others via ITK's image information)."""
        try:
            return int(np.prod(nib.load(source).shape))
        except Exception:
            pass
        try:
            import itk

            reader = itk.ImageIOFactory.CreateImageIO(str(source), itk.CommonEnums.IOFileMode_ReadMode)
            if reader is None:
                return None
            reader.SetFileName(str(source))
            reader.ReadImageInformation()
            return int(np.prod([reader.GetDimensions(i) for i in range(reader.GetNumberOfDimensions())]))
        except Exception:
            return None

    def _check_memory(self, source: Path, voxels: int | None) -> None:
        if voxels is None:
            return
        gib, limit = _max_input_bytes(self.max_gib)
        needed = voxels * 4  # float32 after preprocessing
        if needed > limit:
            raise ScanError(f"{source}: needs about {needed / 2**30:.1f} GiB as float32 ({voxels:,} voxels), over the "
                            f"{gib:g} GiB limit; set {MAX_INPUT_GIB_ENV} to raise it, or crop or resample the scan")

    @staticmethod
    def _check_series_geometry(headers: list, source: Path) -> None:
        orientations = {tuple(np.round(np.asarray(h.get("ImageOrientationPatient", [0] * 6), float), 4)) for h in headers}
        if len(orientations) > 1:
            raise ScanError(f"{source}: the series mixes {len(orientations)} slice orientations; export one orientation per series")
        if len(headers) < 2 or "ImagePositionPatient" not in headers[0]:
            return
        row, column = np.asarray(next(iter(orientations))).reshape(2, 3)
        normal = np.cross(row, column)
        positions = np.array([np.asarray(h.ImagePositionPatient, float) for h in headers])
        order = np.argsort(positions @ normal)
        positions = positions[order]
        steps = np.diff(positions, axis=0)
        along = steps @ normal
        if np.any(np.abs(along) < 1e-3):
            raise ScanError(f"{source}: {int(np.sum(np.abs(along) < 1e-3))} duplicated slice position(s); "
                            "the folder holds repeated or overlapping acquisitions")
        median = float(np.median(along))
        off_axis = np.linalg.norm(steps - np.outer(along, normal), axis=1)
        if np.any(off_axis > SPACING_TOLERANCE * median + 1e-3):
            tilt = float(np.degrees(np.arctan2(off_axis.max(), median)))
            raise ScanError(f"{source}: gantry tilt of about {tilt:.1f} degrees (slices are sheared); "
                            "resample to an orthogonal grid first")
        ratio = along / median
        if np.any(np.abs(ratio - np.round(ratio)) > SPACING_TOLERANCE) or np.any(np.round(ratio) < 1):
            raise ScanError(f"{source}: non-uniform slice spacing ({along.min():.3g} to {along.max():.3g} mm)")
        if np.any(np.round(ratio) > 1):
            missing = int(np.sum(np.round(ratio) - 1))
            raise ScanError(f"{source}: {missing} missing slice(s): gaps of up to {along.max():.3g} mm "
                            f"where the spacing is {median:.3g} mm")

    @staticmethod
    def _validated(image: MetaTensor, source: Path) -> MetaTensor:
        shape = tuple(image.shape)
        if image.ndim == 2 or (image.ndim == 3 and 1 in shape):
            raise ScanError(f"{source}: is a 2D image (shape {shape}); this model needs a 3D volume")
        if image.ndim != 3:
            raise ScanError(f"{source}: has {image.ndim} dimensions (shape {shape}); give one 3D volume "
                            "(split time series or multi-channel images first)")
        bad = int((~torch.isfinite(image.as_tensor().float())).sum()) if image.is_floating_point() else 0
        if bad:
            raise ScanError(f"{source}: contains {bad:,} NaN or infinite voxel(s)")
        return image


class LoadScand(MapTransform):
    """Dictionary version of :class:`LoadScan` (for bundle configs, in place of ``LoadImaged``)."""

    def __init__(self, keys: KeysCollection, series_uid: str | None = None, max_gib: float | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadScan(series_uid, max_gib)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d
