"""Regions to embed: seed points from a CSV table, and the labels of a mask (NIfTI or DICOM-SEG).

Every region is an item ``{"image": scan, "region": "point:<id>" | "label:<value>", "center_lps":
(x, y, z)}`` in mm in the DICOM patient convention (LPS), which :class:`~medfm.workflows.EmbeddingRunner`
embeds from a crop of the model's input size centred there.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import pydicom

from ..errors import MedfmError
from ..transforms.region import voxel_to_lps
from .dicom import _frame_attribute
from .input_list import listed_input

__all__ = ["label_regions", "read_points", "SEGMENTATION_STORAGE"]

#: SOP Class UID of DICOM Segmentation objects.
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
_POINT_COLUMNS = ("image", "x", "y", "z")


def read_points(path: str | os.PathLike) -> list[dict]:
    """Regions from a CSV with columns ``image, x, y, z`` (mm, LPS) and optionally ``id`` (default: the line number).

    Relative image paths are relative to the CSV's folder; an image may be a DICOMweb series URL. A
    missing column, a value that is not a finite number, or an id repeated for one image is a
    :class:`MedfmError` naming the file and line.
    """
    path = Path(path).expanduser()
    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:
            rows = list(csv.DictReader(stream))
            header = rows[0].keys() if rows else []
    except OSError as error:
        raise MedfmError(f"{path}: cannot be read ({error.strerror})") from None
    except UnicodeDecodeError:
        raise MedfmError(f"{path}: not a UTF-8 text file; save the points as UTF-8 CSV") from None
    missing = [column for column in _POINT_COLUMNS if column not in header]
    if not rows or missing:
        raise MedfmError(f"{path}: a points table needs the columns image, x, y, z (mm, LPS) and optionally id; "
                         + (f"missing {', '.join(missing)}" if rows else "it has no rows"))
    regions, seen = [], set()
    for line, row in enumerate(rows, start=2):
        cell = str(row["image"] or "").strip()
        if not cell:
            raise MedfmError(f"{path}: line {line} has no image")
        try:
            center = tuple(float(row[axis]) for axis in "xyz")
        except (TypeError, ValueError):
            raise MedfmError(f"{path}: line {line}: x, y and z must be numbers (mm, LPS)") from None
        if not all(math.isfinite(value) for value in center):
            raise MedfmError(f"{path}: line {line}: x, y and z must be finite")
        identifier = str(row.get("id") or line - 1).strip()
        image = listed_input(cell, path)
        if (image, identifier) in seen:
            raise MedfmError(f"{path}: line {line}: point id {identifier!r} appears twice for {image}")
        seen.add((image, identifier))
        regions.append({"image": str(image), "region": f"point:{identifier}", "center_lps": center})
    return regions


def label_regions(mask: str | os.PathLike, image: str | os.PathLike) -> list[dict]:
    """One region per label of ``mask``, centred on the label's centroid (mm, LPS), for the scan ``image``.

    ``mask`` is a label image in the scan's world space (NIfTI, NRRD, MHA: integer values, 0 is
    background) or a DICOM-SEG (one region per segment number). The centroid is computed in world
    coordinates, so the mask only has to cover the same anatomy, not the same voxel grid.
    """
    mask = Path(mask).expanduser()
    if not mask.is_file():
        raise MedfmError(f"{mask}: no such mask file")
    if _is_dicom_seg(mask):
        _check_referenced_series(mask, image)
        centroids = _segment_centroids(mask)
    else:
        centroids = _label_centroids(mask)
    if not centroids:
        raise MedfmError(f"{mask}: the mask has no labelled voxels")
    return [{"image": str(image), "region": f"label:{value}", "center_lps": tuple(float(c) for c in center)}
            for value, center in centroids.items()]


def _is_dicom_seg(path: Path) -> bool:
    if not pydicom.misc.is_dicom(path):
        return False
    return str(pydicom.dcmread(path, stop_before_pixels=True).get("SOPClassUID", "")) == SEGMENTATION_STORAGE


#: More distinct values than this is an intensity image given as a mask, not a label image (the finest common
#: parcellations, Schaefer 1000 among them, stay below it).
MAX_MASK_LABELS = 1000


def _scan_series_uids(image: str | os.PathLike) -> set[str] | None:
    """The DICOM series UIDs a scan input can be (a series URL, or the series of a DICOM folder); None when unknown."""
    from .dicom import list_dicom_series
    from .dicomweb import DicomWebLocation, is_dicomweb_url

    if is_dicomweb_url(image):
        uid = DicomWebLocation.parse(str(image)).series_uid
        return {uid} if uid else None
    if Path(image).is_dir():
        return {series.uid for series in list_dicom_series(image)} or None
    return None


def _check_referenced_series(mask: Path, image: str | os.PathLike) -> None:
    """A DICOM-SEG names the series it segments: refuse it for another series (its regions would land elsewhere)."""
    header = pydicom.dcmread(mask, stop_before_pixels=True)
    referenced = {str(item.get("SeriesInstanceUID", "")) for item in header.get("ReferencedSeriesSequence", [])}
    candidates = _scan_series_uids(image)
    if candidates is not None and referenced and not referenced & candidates:
        raise MedfmError(f"{mask}: this DICOM-SEG segments series {', '.join(sorted(referenced))}, not the input "
                         f"{image} (series {', '.join(sorted(candidates))}); give the SEG made on this scan")


def _label_centroids(path: Path) -> dict[int, np.ndarray]:
    from .reading import LoadScan

    volume = LoadScan()(path)
    values = np.asarray(volume)
    if not np.array_equal(values, np.round(values)):
        raise MedfmError(f"{path}: a mask must hold integer labels, not {values.dtype} intensities")
    labels = np.rint(values).astype(np.int64)
    found = np.unique(labels)
    if len(found) > MAX_MASK_LABELS + 1:
        raise MedfmError(f"{path}: holds {len(found) - 1} distinct non-zero values, more than the {MAX_MASK_LABELS} "
                         "labels a mask may have; is it an intensity image rather than a label image?")
    return {int(value): voxel_to_lps(volume.affine, np.argwhere(labels == value).mean(axis=0))
            for value in found if value != 0}


def _segment_centroids(path: Path) -> dict[int, np.ndarray]:
    """World centroid (LPS) of every segment of a DICOM-SEG, from its frames' plane positions."""
    dataset = pydicom.dcmread(path)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    pixels = dataset.pixel_array.reshape(frames, int(dataset.Rows), int(dataset.Columns))
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    for frame in range(frames):
        segment = _frame_attribute(dataset, frame, "SegmentIdentificationSequence", "ReferencedSegmentNumber")
        position = _frame_attribute(dataset, frame, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _frame_attribute(dataset, frame, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = _frame_attribute(dataset, frame, "PixelMeasuresSequence", "PixelSpacing")
        if None in (segment, position, orientation, spacing):
            raise MedfmError(f"{path}: DICOM-SEG frame {frame + 1} lacks its segment number, plane position, "
                             "orientation or pixel spacing; it cannot be placed in space")
        rows, columns = np.nonzero(pixels[frame])
        if rows.size == 0:
            continue
        along_row, along_column = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
        # DICOM: column index steps along the row direction by the column spacing (PixelSpacing[1])
        world = (np.asarray(position, float) + np.outer(columns * float(spacing[1]), along_row)
                 + np.outer(rows * float(spacing[0]), along_column))
        sums[int(segment)] = sums.get(int(segment), 0) + world.sum(axis=0)
        counts[int(segment)] = counts.get(int(segment), 0) + rows.size
    return {segment: sums[segment] / counts[segment] for segment in sorted(sums)}
