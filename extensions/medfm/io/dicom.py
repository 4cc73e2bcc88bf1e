"""DICOM specifics: finding series, checking slice geometry, and the pydicom / nibabel readers.

ITK (GDCM) reads ordinary series folders, but it ignores the per-frame functional groups of
Enhanced multi-frame files (real Enhanced MR read with a 1 mm pixel spacing instead of 1.6 mm)
and reads a Siemens mosaic as one 2D tile image. Those files, and series ITK cannot read at
all, go through the functions here. Every array is returned in MONAI's layout, (column, row,
slice), with a RAS affine, so that it matches what MONAI's ITKReader gives for the same files.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from ..errors import MedfmError, first_line

__all__ = [
    "DicomGeometryError",
    "DicomSeries",
    "list_dicom_series",
    "sorted_slices",
    "series_geometry",
    "check_plane_geometry",
    "rescale_varies",
    "stack_series",
    "read_multiframe",
    "read_mosaic",
    "is_mosaic",
    "frame_positions",
    "LPS_TO_RAS",
]

#: Relative deviation of a slice gap from the median gap that still counts as uniform.
SPACING_TOLERANCE = 0.01
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class DicomGeometryError(MedfmError):
    """Slices that do not form one regular 3D grid (the message says why, without the file name)."""


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


def sorted_slices(orientations: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Check that slices form one regular grid; return their order and the step between them.

    ``orientations``: (n, 6) ImageOrientationPatient; ``positions``: (n, 3) ImagePositionPatient
    in mm (LPS). Returns the slice indices sorted along the slice normal and the mean step
    vector (mm) from one slice to the next. Raises :class:`DicomGeometryError` for mixed
    orientations, duplicated positions, gantry tilt, non-uniform spacing and missing slices.
    """
    distinct = np.unique(np.round(orientations, 4), axis=0)
    if len(distinct) > 1:
        raise DicomGeometryError(f"mixes {len(distinct)} slice orientations; export one orientation per series")
    row, column = orientations[0].reshape(2, 3)
    normal = np.cross(row, column)
    order = np.argsort(positions @ normal, kind="stable")
    if len(order) < 2:
        return order, normal
    ordered = positions[order]
    steps = np.diff(ordered, axis=0)
    along = steps @ normal
    if np.any(np.abs(along) < 1e-3):
        raise DicomGeometryError(f"{int(np.sum(np.abs(along) < 1e-3))} duplicated slice position(s); "
                                 "the input holds repeated or overlapping acquisitions")
    median = float(np.median(along))
    off_axis = np.linalg.norm(steps - np.outer(along, normal), axis=1)
    if np.any(off_axis > SPACING_TOLERANCE * median + 1e-3):
        tilt = float(np.degrees(np.arctan2(off_axis.max(), median)))
        raise DicomGeometryError(f"gantry tilt of about {tilt:.1f} degrees (slices are sheared); "
                                 "resample to an orthogonal grid first")
    ratio = along / median
    if np.any(np.abs(ratio - np.round(ratio)) > SPACING_TOLERANCE) or np.any(np.round(ratio) < 1):
        raise DicomGeometryError(f"non-uniform slice spacing ({along.min():.3g} to {along.max():.3g} mm)")
    if np.any(np.round(ratio) > 1):
        missing = int(np.sum(np.round(ratio) - 1))
        raise DicomGeometryError(f"{missing} missing slice(s): gaps of up to {along.max():.3g} mm "
                                 f"where the spacing is {median:.3g} mm")
    return order, (ordered[-1] - ordered[0]) / (len(ordered) - 1)


def _ras_affine(orientation: np.ndarray, pixel_spacing, origin: np.ndarray, slice_step: np.ndarray) -> np.ndarray:
    """RAS affine of a (column, row, slice) array from DICOM plane geometry (LPS, mm)."""
    row, column = np.asarray(orientation, float).reshape(2, 3)
    row_spacing, column_spacing = (float(s) for s in pixel_spacing)
    affine = np.eye(4)
    # DICOM's "row" cosine points along a row, i.e. towards increasing column index
    affine[:3, 0] = row * column_spacing
    affine[:3, 1] = column * row_spacing
    affine[:3, 2] = slice_step
    affine[:3, 3] = origin
    return LPS_TO_RAS @ affine


def _rescaled(stored: np.ndarray, slopes: np.ndarray, intercepts: np.ndarray) -> np.ndarray:
    """Stored values (slices first) to modality values; integers stay integers where they are exact."""
    if np.all(slopes == 1) and np.all(intercepts == 0):
        return stored
    slopes = slopes.reshape(-1, *([1] * (stored.ndim - 1)))
    intercepts = intercepts.reshape(slopes.shape)
    if np.all(slopes == np.round(slopes)) and np.all(intercepts == np.round(intercepts)):
        # int32 arithmetic (half the memory of int64) only where no value can overflow it
        bound = float(np.abs(stored).max()) * float(np.abs(slopes).max()) + float(np.abs(intercepts).max())
        wide = np.int32 if bound <= np.iinfo(np.int32).max else np.int64
        values = stored.astype(wide) * slopes.astype(wide) + intercepts.astype(wide)
        if values.min() >= np.iinfo(np.int16).min and values.max() <= np.iinfo(np.int16).max:
            return values.astype(np.int16)
        return values
    return (stored * slopes + intercepts).astype(np.float32)


def _pixels(dataset: pydicom.Dataset) -> np.ndarray:
    try:
        return dataset.pixel_array
    except Exception as error:
        raise DicomGeometryError(f"pixel data cannot be decoded ({first_line(error)})") from None


def series_geometry(headers: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Check the slices of a single-frame series from their headers alone.

    Returns the orientation (6,), the slice order, the first slice's position and the step
    between slices (mm, LPS); raises :class:`DicomGeometryError` as :func:`sorted_slices` does.
    """
    if any("ImageOrientationPatient" not in h or "ImagePositionPatient" not in h for h in headers):
        raise DicomGeometryError("slices without ImagePositionPatient / ImageOrientationPatient; "
                                 "they cannot be placed in space")
    orientations = _numbers(headers, "ImageOrientationPatient", 6)
    positions = _numbers(headers, "ImagePositionPatient", 3)
    check_plane_geometry(orientations[0], headers)
    order, step = sorted_slices(orientations, positions)
    return orientations[0], order, positions[order[0]], step


def _numbers(headers: list, keyword: str, count: int) -> np.ndarray:
    """One multi-valued attribute of every slice as a finite float array ``(slices, count)``."""
    try:
        values = np.array([np.asarray(h.get(keyword), float).reshape(count) for h in headers])
    except (TypeError, ValueError):
        raise DicomGeometryError(f"{keyword} is not {count} numbers in every slice") from None
    bad = int(np.sum(~np.isfinite(values).all(axis=1)))
    if bad:
        raise DicomGeometryError(f"{bad} slice(s) with a NaN or infinite {keyword}; they cannot be placed in space")
    return values


def check_plane_geometry(orientation: np.ndarray, headers: list) -> None:
    """Check what places and sizes each slice: unit, orthogonal direction cosines, and one pixel
    spacing and one size (Rows x Columns) for all slices (ITK reads the first slice's and
    silently applies it to all, or takes 1 mm when PixelSpacing is missing)."""
    row, column = np.asarray(orientation, float).reshape(2, 3)
    lengths = np.linalg.norm(row), np.linalg.norm(column)
    if min(lengths) < 1e-6 or np.linalg.norm(np.cross(row, column)) < 1e-3:
        raise DicomGeometryError(f"ImageOrientationPatient {[float(v) for v in orientation]} is degenerate (a zero direction, "
                                 "or row and column directions that are parallel)")
    if any(abs(n - 1) > 1e-3 for n in lengths):
        raise DicomGeometryError(f"ImageOrientationPatient direction cosines are not unit vectors (lengths "
                                 f"{lengths[0]:.3g} and {lengths[1]:.3g})")
    if abs(float(row @ column)) > 1e-3:
        raise DicomGeometryError(f"ImageOrientationPatient row and column directions are not perpendicular "
                                 f"({np.degrees(np.arccos(np.clip(row @ column, -1, 1))):.1f} degrees apart)")
    if any("PixelSpacing" not in h for h in headers):
        missing = sum("PixelSpacing" not in h for h in headers)
        raise DicomGeometryError(f"{missing} slice(s) without PixelSpacing; the voxel size is unknown")
    spacings = _numbers(headers, "PixelSpacing", 2)
    if np.any(spacings <= 0):
        raise DicomGeometryError(f"PixelSpacing {spacings[np.any(spacings <= 0, axis=1)][0].tolist()} is not positive")
    distinct = np.unique(np.round(spacings, 4), axis=0)
    if len(distinct) > 1:
        raise DicomGeometryError(f"slices have {len(distinct)} different PixelSpacing values ("
                                 f"{', '.join('x'.join(f'{v:g}' for v in d) for d in distinct[:3])} mm); "
                                 "they are not one volume")
    sizes = sorted({(int(h.get("Rows", 0) or 0), int(h.get("Columns", 0) or 0)) for h in headers})
    if len(sizes) > 1:
        raise DicomGeometryError(f"slices have {len(sizes)} different sizes ({', '.join(f'{r}x{c}' for r, c in sizes[:3])}); "
                                 "they are not one volume")


def rescale_varies(headers: list) -> bool:
    """Whether RescaleSlope / RescaleIntercept differ between slices (ITK then keeps the first
    slice's integer type and truncates the others' values; pydicom's stacking does not)."""
    pairs = {(float(h.get("RescaleSlope", 1) or 1), float(h.get("RescaleIntercept", 0) or 0)) for h in headers}
    return len(pairs) > 1


def stack_series(files: list[Path], geometry: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Read a single-frame series with pydicom: (column, row, slice) array and its RAS affine.

    ``geometry`` is what :func:`series_geometry` returned for the files' headers.
    """
    orientation, order, origin, step = geometry
    datasets = [pydicom.dcmread(files[i]) for i in order]
    stored = np.stack([_pixels(d) for d in datasets])
    slopes = np.array([float(d.get("RescaleSlope", 1) or 1) for d in datasets])
    intercepts = np.array([float(d.get("RescaleIntercept", 0) or 0) for d in datasets])
    volume = _rescaled(stored, slopes, intercepts).transpose(2, 1, 0)
    return volume, _ras_affine(orientation, datasets[0].PixelSpacing, origin, step)


def _frame_attribute(dataset: pydicom.Dataset, frame: int, sequence: str, keyword: str):
    """An attribute from the per-frame functional group, else the shared one, else None."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = dataset.get(groups)
        if items and len(items) > index and sequence in items[index] and keyword in items[index][sequence][0]:
            return items[index][sequence][0][keyword].value
    return None


def read_multiframe(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an Enhanced (multi-frame) DICOM file: (column, row, slice) array and its RAS affine.

    Geometry comes from the functional groups: PlanePositionSequence per frame,
    PlaneOrientationSequence and PixelMeasuresSequence per frame or shared.
    """
    dataset = pydicom.dcmread(path)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    geometry = [(_frame_attribute(dataset, i, "PlaneOrientationSequence", "ImageOrientationPatient"),
                 _frame_attribute(dataset, i, "PlanePositionSequence", "ImagePositionPatient"),
                 _frame_attribute(dataset, i, "PixelMeasuresSequence", "PixelSpacing")) for i in range(frames)]
    if any(value is None for frame in geometry for value in frame):
        raise DicomGeometryError(f"multi-frame file without plane position, orientation or pixel spacing for "
                                 f"its {frames} frames; it cannot be placed in space")
    spacings = {tuple(np.round(np.asarray(frame[2], float), 5)) for frame in geometry}
    if len(spacings) > 1:
        raise DicomGeometryError(f"frames have {len(spacings)} different pixel spacings")
    orientations = np.array([np.asarray(frame[0], float) for frame in geometry])
    positions = np.array([np.asarray(frame[1], float) for frame in geometry])
    order, step = sorted_slices(orientations, positions)
    if np.array_equal(order, np.arange(frames)[::-1]):
        # frames stored in decreasing position keep the file's order, as ITK keeps it
        order, step = order[::-1], -step
    stored = _pixels(dataset).reshape(frames, int(dataset.Rows), int(dataset.Columns))[order]
    slopes = np.array([float(_frame_attribute(dataset, i, "PixelValueTransformationSequence", "RescaleSlope")
                             or dataset.get("RescaleSlope", 1) or 1) for i in order])
    intercepts = np.array([float(_frame_attribute(dataset, i, "PixelValueTransformationSequence", "RescaleIntercept")
                                 or dataset.get("RescaleIntercept", 0) or 0) for i in order])
    volume = _rescaled(stored, slopes, intercepts).transpose(2, 1, 0)
    return volume, _ras_affine(orientations[0], geometry[0][2], positions[order[0]], step)


def frame_positions(dataset: pydicom.Dataset) -> np.ndarray:
    """ImagePositionPatient (mm, LPS) of each frame: (frames, 3); one row for a single-frame image."""
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" in dataset:
        positions = [_frame_attribute(dataset, i, "PlanePositionSequence", "ImagePositionPatient") for i in range(frames)]
    else:
        positions = [dataset.get("ImagePositionPatient")]
    if any(position is None for position in positions):
        raise DicomGeometryError("a frame has no ImagePositionPatient")
    return np.array([np.asarray(position, float) for position in positions])


def is_mosaic(header: pydicom.Dataset) -> bool:
    """Siemens mosaic: many slices tiled into one 2D frame."""
    return "MOSAIC" in [str(value).upper() for value in header.get("ImageType", [])]


def read_mosaic(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a Siemens mosaic with nibabel's CSA-header support: (column, row, slice) array and RAS affine."""
    dataset = pydicom.dcmread(path)
    with warnings.catch_warnings():
        # nibabel flags all its DICOM wrappers as experimental; its mosaic support is the mature part
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import dicomwrappers

        try:
            wrapper = dicomwrappers.wrapper_from_data(dataset)
            volume = np.asarray(wrapper.get_data())
            affine = np.asarray(wrapper.affine, float)
        except Exception as error:
            raise DicomGeometryError(f"Siemens mosaic cannot be unpacked ({first_line(error)})") from None
    # nibabel indexes (row, column, slice); MONAI's layout is (column, row, slice)
    return volume.transpose(1, 0, 2), LPS_TO_RAS @ affine[:, [1, 0, 2, 3]]
