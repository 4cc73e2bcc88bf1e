"""Small real scans shipped as package data, and a writer that turns any of them into a DICOM series.

Provenance and licences: ``README.md`` beside this file.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

__all__ = ["SAMPLES", "path", "write_dicom_series"]

_HERE = Path(__file__).resolve().parent

#: name -> (file name, DICOM modality)
SAMPLES: dict[str, tuple[str, str]] = {
    "ct_head": ("ct_head_brain_atlas_2mm.nii.gz", "CT"),
    "mr_head_t1": ("mr_head_t1_itk.nii.gz", "MR"),
}


def path(name: str) -> str:
    """Absolute path of the sample ``name`` (one of :data:`SAMPLES`)."""
    if name not in SAMPLES:
        raise KeyError(f"unknown sample {name!r}; available: {', '.join(SAMPLES)}")
    return str(_HERE / SAMPLES[name][0])


def directory() -> str:
    """The folder that holds the sample files."""
    return str(_HERE)


def write_dicom_series(name_or_path: str, out_dir: str | Path, modality: str | None = None) -> list[Path]:
    """Write a NIfTI volume (a sample name or a file path) as a single-frame DICOM series.

    One file per slice along the third voxel axis, with ImagePositionPatient,
    ImageOrientationPatient and PixelSpacing taken from the NIfTI affine (RAS converted to DICOM's
    LPS), so DICOM readers rebuild the same voxel-to-world mapping. Integer voxel values are stored
    as signed 16-bit pixels (CT: Hounsfield units with slope 1, intercept 0).

    Returns the written file paths, in slice order.
    """
    if name_or_path in SAMPLES:
        source, default_modality = path(name_or_path), SAMPLES[name_or_path][1]
    else:
        source, default_modality = str(name_or_path), "OT"
    modality = modality or default_modality
    image = nib.load(source)
    data = np.asarray(image.dataobj)
    if data.ndim != 3:
        raise ValueError(f"{source}: expected a 3D volume, got shape {data.shape}")
    if not np.allclose(data, np.round(data)) or data.min() < -32768 or data.max() > 32767:
        raise ValueError(f"{source}: values must be integers in the int16 range to be written as DICOM pixels")
    pixels = np.round(data).astype(np.int16)

    lps = np.diag([-1.0, -1.0, 1.0]) @ image.affine[:3, :]
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_cosine = lps[:3, 0] / spacing[0]  # along a row: increasing column index = voxel axis 0
    column_cosine = lps[:3, 1] / spacing[1]  # down a column: increasing row index = voxel axis 1

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    sop_class = {"CT": CTImageStorage, "MR": MRImageStorage}.get(modality, CTImageStorage)
    now = datetime.datetime.now()
    written = []
    for k in range(pixels.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.PatientName = "medfm^sample"
        ds.PatientID = f"medfm-{Path(source).name.split('.')[0]}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate = ds.SeriesDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = now.strftime("%H%M%S")
        ds.Modality = modality
        ds.SeriesDescription = f"medfm sample {Path(source).name}"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImagePositionPatient = [float(v) for v in lps[:3, :3] @ [0, 0, k] + lps[:3, 3]]
        ds.ImageOrientationPatient = [float(v) for v in (*row_cosine, *column_cosine)]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # (between rows, between columns)
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = pixels.shape[1], pixels.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(pixels[:, :, k].T).tobytes()
        target = out_dir / f"slice_{k:04d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        written.append(target)
    return written
