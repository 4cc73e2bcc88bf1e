"""Writing segmentations on the input's own grid: NIfTI always, DICOM-SEG for DICOM inputs."""

from __future__ import annotations

import gzip
import logging
import os
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils.type_conversion import convert_data_type

from .. import __version__
from ..errors import MedfmError
from .atomic import atomic_path
from .dicomweb import is_dicomweb_url, series_headers
from .dicom import LPS_TO_RAS, frame_positions, is_mosaic, list_dicom_series
from .embeddings import input_meta, output_stem
from .reading import safe_extract_zip

__all__ = ["SegmentationWriteError", "SaveSegmentation", "SaveSegmentationd", "corner_offset_mm", "labels_by_value", "source_datasets"]

logger = logging.getLogger(__name__)

#: Largest voxel-to-world disagreement (mm) between a segmentation and its input's grid.
GRID_TOLERANCE_MM = 1e-4


class SegmentationWriteError(MedfmError):
    """A segmentation that cannot be written so that it lines up with its input."""


def source_datasets(source: str | os.PathLike, series_uid: str) -> list[pydicom.Dataset]:
    """Headers of the DICOM series ``series_uid`` that ``source`` (folder, zip, file or DICOMweb URL) was read from."""
    if is_dicomweb_url(source):
        return series_headers(str(source), series_uid)
    source = Path(source)
    if source.is_file() and not source.suffix.lower() == ".zip":
        return [pydicom.dcmread(source, stop_before_pixels=True)]
    with tempfile.TemporaryDirectory(prefix="medfm-seg-") as scratch:
        folder = safe_extract_zip(source, scratch) if source.is_file() else source
        matches = [series for series in list_dicom_series(folder) if series.uid == series_uid]
        if not matches:
            raise SegmentationWriteError(f"{source}: series {series_uid} is no longer there to refer to")
        return matches[0].headers


def labels_by_value(labels: Mapping[int | str, str] | Sequence[str]) -> dict[int, str]:
    """The foreground labels ``{value: name}`` of a Decathlon ``labels`` mapping (or names in value order)."""
    if isinstance(labels, Mapping):
        named = {int(value): str(name) for value, name in labels.items()}
    else:
        named = {value: str(name) for value, name in enumerate(labels)}
    named = {value: name for value, name in named.items() if value != 0}  # 0 is background
    if not named:
        raise ValueError("a segmentation needs at least one non-background label")
    return named


def corner_offset_mm(affine: np.ndarray, reference: np.ndarray, shape: Sequence[int]) -> float:
    """Largest distance (mm) between where two affines put the 8 corner voxels of a grid of ``shape``."""
    corners = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]).T
    return float(np.abs((np.asarray(affine, float) - np.asarray(reference, float)) @ corners).max())


class SaveSegmentation:
    """Save a label volume that lies on its input's grid, named after the input.

    ``label``: integer label values, shape (X, Y, Z) or (1, X, Y, Z), with the input's affine
    (invert the spatial preprocessing first, e.g. with ``Invertd``). ``image_meta``: the loaded
    input's metadata (``filename_or_obj``, ``original_affine``, ``spatial_shape`` and, for DICOM,
    ``SeriesInstanceUID``). Writes ``<stem>_<postfix>.nii.gz`` and, when the input was a DICOM
    series or multi-frame file and ``dicom_seg`` is set, ``<stem>_<postfix>.dcm``: a DICOM-SEG
    (highdicom, one segment per label) that refers to the source instances. A label volume that
    is not on the input's grid is refused rather than written misaligned. Returns the paths.
    """

    def __init__(self, output_dir: str | os.PathLike, labels: Mapping[int | str, str] | Sequence[str],
                 postfix: str = "seg", dicom_seg: bool = True, algorithm: str = "medfm",
                 algorithm_version: str = "") -> None:
        self.output_dir = Path(output_dir)
        self.labels = labels_by_value(labels)
        self.postfix = postfix
        self.dicom_seg = dicom_seg
        self.algorithm = algorithm
        self.algorithm_version = algorithm_version or __version__

    def __call__(self, label, image_meta: Mapping) -> list[Path]:
        source = str(image_meta["filename_or_obj"])
        volume = convert_data_type(label, np.ndarray)[0]
        volume = volume[0] if volume.ndim == 4 and volume.shape[0] == 1 else volume
        affine = np.asarray(convert_data_type(label.affine if isinstance(label, MetaTensor) else image_meta["original_affine"],
                                              np.ndarray)[0], float)
        self._check_on_input_grid(volume, affine, image_meta, source)
        values = np.rint(volume).astype(np.uint16 if max(self.labels) > 255 else np.uint8)
        unknown = sorted(set(np.unique(values).tolist()) - set(self.labels) - {0})
        if unknown:
            raise SegmentationWriteError(f"{source}: label values {unknown} have no name in the labels given")
        # the DICOM-SEG is built before anything is written, so a failure leaves no output behind
        dicom_seg = None
        if self.dicom_seg and image_meta.get("SeriesInstanceUID"):
            dicom_seg = self._dicom_seg(values, affine, source, str(image_meta["SeriesInstanceUID"]))
        stem = self.output_dir / f"{output_stem(source)}_{self.postfix}"
        written = [stem.with_name(stem.name + ".nii.gz")]
        self._write_nifti(values, affine, written[0])
        if dicom_seg is not None:
            written.append(stem.with_name(stem.name + ".dcm"))
            with atomic_path(written[1]) as temporary:
                dicom_seg.save_as(temporary)
        return written

    @staticmethod
    def _check_on_input_grid(volume: np.ndarray, affine: np.ndarray, image_meta: Mapping, source: str) -> None:
        shape = tuple(int(s) for s in np.asarray(image_meta.get("spatial_shape", volume.shape)).ravel())
        original = np.asarray(convert_data_type(image_meta.get("original_affine", affine), np.ndarray)[0], float)
        offset = corner_offset_mm(affine, original, shape)
        if volume.ndim != 3 or tuple(volume.shape) != shape or offset > GRID_TOLERANCE_MM:
            raise SegmentationWriteError(
                f"{source}: the segmentation (shape {tuple(volume.shape)}) is not on the input's grid (shape {shape}, "
                f"corners {offset:.3g} mm apart); invert the spatial preprocessing (Invertd) before saving")

    @staticmethod
    def _write_nifti(values: np.ndarray, affine: np.ndarray, target: Path) -> None:
        image = nib.Nifti1Image(values, affine)
        image.header.set_xyzt_units("mm")
        with atomic_path(target) as temporary:
            temporary.write_bytes(gzip.compress(image.to_bytes(), compresslevel=6))

    def _dicom_seg(self, values: np.ndarray, affine: np.ndarray, source: str, series_uid: str) -> pydicom.Dataset | None:
        """The DICOM-SEG dataset, or None (with a warning) for sources it cannot refer to."""
        import highdicom as hd
        from pydicom.sr.codedict import codes

        datasets = [_with_type2_attributes(d) for d in source_datasets(source, series_uid)]
        if any(is_mosaic(d) for d in datasets):
            logger.warning("%s: no DICOM-SEG written: a Siemens mosaic packs many slices into one frame, so a "
                           "segmentation cannot refer to it slice by slice (the NIfTI segmentation is written)", source)
            return None
        frames = self._frames_of(values, affine, datasets, source)
        descriptions = [
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name,
                segmented_property_category=codes.SCT.Tissue,
                # free-text label names have no standard code: a private coding scheme keeps the name
                segmented_property_type=hd.sr.CodedConcept(f"L{number}", "99MEDFM", name),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=hd.AlgorithmIdentificationSequence(
                    name=self.algorithm, version=self.algorithm_version, family=codes.cid7162.ArtificialIntelligence),
            )
            for number, (_, name) in enumerate(sorted(self.labels.items()), start=1)
        ]
        # DICOM-SEG segment numbers run 1..n; map each label value to its segment number
        numbering = np.zeros(max(self.labels) + 1, np.uint16)
        for number, value in enumerate(sorted(self.labels), start=1):
            numbering[value] = number
        segment_numbers = numbering[frames]
        segmentation = hd.seg.Segmentation(
            source_images=datasets, pixel_array=segment_numbers.astype(np.uint8 if len(self.labels) < 256 else np.uint16),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
            series_instance_uid=hd.UID(), series_number=900, sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer="medfm", manufacturer_model_name=self.algorithm, software_versions=self.algorithm_version,
            device_serial_number="none", series_description=f"{self.algorithm} segmentation", omit_empty_frames=False)
        return segmentation

    @staticmethod
    def _frames_of(values: np.ndarray, affine: np.ndarray, datasets: list[pydicom.Dataset], source: str) -> np.ndarray:
        """One (rows, columns) frame per source frame, in the sources' order, from a (column, row, slice) volume."""
        to_voxel = np.linalg.inv(affine) @ LPS_TO_RAS
        frames = []
        for dataset in datasets:
            positions = frame_positions(dataset)
            voxels = (to_voxel @ np.c_[positions, np.ones(len(positions))].T)[:3].T
            slices = np.rint(voxels[:, 2]).astype(int)
            if np.abs(voxels[:, :2]).max() > 1e-3 or np.abs(voxels[:, 2] - slices).max() > 1e-3 \
                    or slices.min() < 0 or slices.max() >= values.shape[2]:
                raise SegmentationWriteError(f"{source}: the segmentation's slices do not coincide with the source "
                                             "series' frames; it cannot be written as DICOM-SEG")
            frames.extend(values[:, :, k].T for k in slices)
        return np.stack(frames)


#: Patient and study attributes a DICOM-SEG must carry, though they may be empty (DICOM type 2).
_TYPE2_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                     "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _with_type2_attributes(dataset: pydicom.Dataset) -> pydicom.Dataset:
    """Sparse exports often omit these; the DICOM-SEG copies them, so they are added empty."""
    for keyword in _TYPE2_ATTRIBUTES:
        if keyword not in dataset:
            setattr(dataset, keyword, "")
    return dataset


class SaveSegmentationd(MapTransform):
    """Dictionary version of :class:`SaveSegmentation`; the input's metadata come from ``source_key``."""

    def __init__(self, keys: KeysCollection, output_dir: str | os.PathLike, labels: Mapping[int | str, str] | Sequence[str],
                 source_key: str = "image", postfix: str = "seg", dicom_seg: bool = True, algorithm: str = "medfm",
                 algorithm_version: str = "", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.source_key = source_key
        self.saver = SaveSegmentation(output_dir, labels, postfix, dicom_seg, algorithm, algorithm_version)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        meta = input_meta(d, self.source_key, type(self).__name__)
        for key in self.key_iterator(d):
            self.saver(d[key], meta)
        return d
