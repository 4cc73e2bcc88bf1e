"""Reading user scans: one entry point for files, DICOM folders and zipped DICOM series.

Every problem is reported as one :class:`ScanError` line that names the input and what is
wrong; problems that leave the geometry trustworthy are logged as warnings instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import zipfile
from collections.abc import Hashable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import torch
from monai.config import KeysCollection
from monai.data import ITKReader, MetaTensor, NibabelReader
from monai.transforms import MapTransform, Transform
from monai.utils import SpaceKeys, convert_to_numpy

from ..errors import MedfmError, first_line, innermost
from ..limits import positive_setting
from .archives import ArchiveError, safe_extract_zip
from .dicomweb import adopt_url_credentials, downloaded, image_series, is_dicomweb_url
from .dicom import (DicomGeometryError, DicomSeries, is_mosaic, list_dicom_series, read_mosaic, read_multiframe,
                    rescale_varies, series_geometry, stack_series)

__all__ = ["IN_MEMORY", "in_memory_scan",
    "ScanError",
    "DicomSeries",
    "list_dicom_series",
    "LoadScan",
    "LoadScand",
    "MAX_INPUT_GIB_ENV",
]

logger = logging.getLogger(__name__)

#: Environment variable with the largest input (GiB of float32 voxels) medfm will load.
MAX_INPUT_GIB_ENV = "MEDFM_MAX_INPUT_GIB"
DEFAULT_MAX_INPUT_GIB = 8.0


class ScanError(MedfmError):
    """An input scan that cannot be processed safely, explained in one line."""


def _max_input_bytes(max_gib: float | None) -> tuple[float, int]:
    gib = max_gib if max_gib is not None else positive_setting(MAX_INPUT_GIB_ENV, DEFAULT_MAX_INPUT_GIB, "GiB")
    return gib, int(gib * 2**30)


class LoadScan(Transform):
    """Load one scan as a MetaTensor after checking that it is safe to process.

    Accepts a NIfTI file (read with nibabel), an NRRD/MHA file, a DICOM series folder or a
    ``.zip`` of a DICOM series (read with ITK; with pydicom where ITK fails), a single Enhanced
    multi-frame DICOM file (pydicom, geometry from its functional groups) or a Siemens mosaic
    (nibabel). A folder with several series needs ``series_uid``; without it the error lists the
    series found. Before reading voxels it estimates the memory from the headers and refuses
    inputs above ``max_gib`` (default ``$MEDFM_MAX_INPUT_GIB`` or 8 GiB of float32). After
    reading it rejects 2D images, 4D inputs and NaN/Inf voxels; DICOM slices are checked for
    duplicated positions, missing slices or non-uniform spacing, mixed orientations and gantry
    tilt. With ``allow_2d`` (for models that read 2D images), a single DICOM slice or a 2D
    image file (PNG, JPEG, ...) is returned as one slice ``(X, Y, 1)``; colour channels of a 2D
    image are averaged to gray.

    Returns the array without a channel axis, in (column, row, slice) order for DICOM as MONAI's
    readers do, in the file's own dtype (modality values: DICOM rescale applied), with a RAS
    affine, the input path in ``meta["filename_or_obj"]`` and, for DICOM,
    ``meta["SeriesInstanceUID"]`` and ``meta["Modality"]``.
    """

    def __init__(self, series_uid: str | None = None, max_gib: float | None = None, allow_2d: bool = False) -> None:
        self.series_uid = series_uid or None
        self.max_gib = max_gib
        self.allow_2d = allow_2d

    def __call__(self, path: str | os.PathLike | MetaTensor) -> MetaTensor:
        if isinstance(path, MetaTensor):  # a volume in memory (medfm.load(...).predict): checked as a file's would be
            scan = in_memory_scan(path)
            return self._validated(scan, Path(scan.meta["filename_or_obj"]))
        if is_dicomweb_url(path):
            return self._load_remote(adopt_url_credentials(str(path)))
        source = Path(path)
        if not source.exists():
            raise ScanError(f"{source}: no such file or folder")
        if not (source.is_file() or source.is_dir()):  # reading a FIFO or a device would block or never end
            raise ScanError(f"{source}: not a regular file or folder (a pipe, socket or device cannot be read as a scan)")
        if source.is_file() and zipfile.is_zipfile(source):
            with tempfile.TemporaryDirectory(prefix="medfm-zip-") as folder:
                try:
                    unpacked = safe_extract_zip(source, folder)
                except ArchiveError as error:
                    raise ScanError(str(error)) from None
                return self._load_folder(unpacked, source)
        if source.is_dir():
            return self._load_folder(source, source)
        if pydicom.misc.is_dicom(source):
            return self._load_dicom_file(source)
        if source.name.lower().endswith((".nii", ".nii.gz")):
            _check_nifti_header(source)
        self._check_memory(source, self._file_voxels(source))
        return self._validated(self._read(str(source), source), source)

    def _load_remote(self, url: str) -> MetaTensor:
        """A series on a DICOMweb server, checked before download and read as a local series folder."""
        series = image_series(url, self.series_uid)
        if len(series) > 1:
            raise ScanError(f"{url}: {len(series)} image series, choose one with series_uid or give its series URL: "
                            f"{'; '.join(s.summary() for s in series)}")
        self._check_memory(url, series[0].voxels)
        with downloaded(series) as folder:
            return self._load_folder(folder, url)

    def _read(self, target: str | list[str], source: Path) -> MetaTensor:
        """Read a NIfTI file (nibabel), another image file, or a DICOM series given as its sorted files (ITK)."""
        # ITK's NIfTI reader silently turns NaN and Inf into 0; nibabel, the reference
        # implementation, keeps them (and gives the same voxels and affine otherwise)
        nifti = isinstance(target, str) and target.lower().endswith((".nii", ".nii.gz"))
        reader = NibabelReader() if nifti else ITKReader()
        try:
            # the reader is called directly: LoadImage would quietly retry with other readers
            # (whose geometry handling differs) when this one fails. A series goes to ITK as the
            # file list already chosen and sorted, so GDCM does not scan the folder again. The
            # file's own dtype is kept: a float32 copy of a large int16 series doubles memory
            if isinstance(target, list):
                import itk

                volume, meta = reader.get_data(itk.imread(target))
            else:
                volume, meta = reader.get_data(reader.read(target))
        except Exception as error:
            raise ScanError(f"{source}: cannot be read as an image ({first_line(innermost(error))})") from None
        meta["filename_or_obj"] = str(source)
        if not volume.dtype.isnative:  # big-endian files (e.g. Analyze-era NIfTI): torch takes native order only
            volume = volume.astype(volume.dtype.newbyteorder("="))
        return MetaTensor.ensure_torch_and_prune_meta(volume, meta)

    def _load_folder(self, folder: Path, source: Path | str) -> MetaTensor:
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
        if len(series.files) == 1:
            return self._load_dicom_file(series.files[0], headers[0], source)
        self._check_memory(source, int(headers[0].Rows) * int(headers[0].Columns) * len(headers))
        with _geometry_errors(source):
            geometry = series_geometry(headers)  # ITK would read a broken series without complaint
        image = None
        if not rescale_varies(headers):  # ITK would keep the first slice's integer type for all
            try:
                image = self._read([str(series.files[i]) for i in geometry[1]], source)
            except ScanError as error:
                logger.warning("%s; reading it with pydicom instead", error)
        if image is None:
            with _geometry_errors(source):
                volume, affine = stack_series(series.files, geometry)
            image = _meta_tensor(volume, affine, source)
        return self._validated(_with_dicom_meta(image, headers[0]), source)

    def _load_dicom_file(self, path: Path, header: pydicom.Dataset | None = None, source: Path | None = None) -> MetaTensor:
        """One DICOM file: a multi-frame (Enhanced) volume or a Siemens mosaic; one plain slice is 2D.

        ``header``: the file's header when a folder scan already read it.
        """
        source = source or path
        header = header if header is not None else pydicom.dcmread(path, stop_before_pixels=True)
        frames = int(header.get("NumberOfFrames", 1) or 1)
        mosaic = is_mosaic(header)
        if frames == 1 and not mosaic and self.allow_2d:
            self._check_memory(source, int(header.Rows) * int(header.Columns))
            return self._validated(_with_dicom_meta(self._read(str(path), source), header), source)
        if frames == 1 and not mosaic:
            raise ScanError(f"{source}: is a single 2D DICOM slice ({header.get('Rows')}x{header.get('Columns')}); "
                            "give the folder that holds the whole series")
        # a mosaic tiles all its slices into one frame, so its voxel count is the frame's
        self._check_memory(source, int(header.Rows) * int(header.Columns) * frames)
        with _geometry_errors(source):
            volume, affine = read_mosaic(path) if mosaic else read_multiframe(path)
        return self._validated(_with_dicom_meta(_meta_tensor(volume, affine, source), header), source)

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

    def _check_memory(self, source: Path | str, voxels: int | None) -> None:
        if voxels is None:
            return
        gib, limit = _max_input_bytes(self.max_gib)
        needed = voxels * 4  # float32 after preprocessing
        if needed > limit:
            raise ScanError(f"{source}: needs about {needed / 2**30:.1f} GiB as float32 ({voxels:,} voxels), over the "
                            f"{gib:g} GiB limit; set {MAX_INPUT_GIB_ENV} to raise it, or crop or resample the scan")

    def _validated(self, image: MetaTensor, source: Path) -> MetaTensor:
        shape = tuple(image.shape)
        if 0 in shape:
            raise ScanError(f"{source}: has an empty axis (shape {shape}); it holds no voxels")
        if image.ndim == 2 or _is_colour_2d(image) or (image.ndim == 3 and 1 in shape):
            if not self.allow_2d:
                raise ScanError(f"{source}: is a 2D image (shape {shape}); this model needs a 3D volume")
            image = _as_single_slice(image)
            if image.shape[-1] != 1:
                raise ScanError(f"{source}: is a single slice along another axis than the last (shape {shape}); "
                                "give it as (X, Y, 1)")
        if image.ndim != 3:
            raise ScanError(f"{source}: has {image.ndim} dimensions (shape {shape}); give one 3D volume "
                            "(split time series or multi-channel images first)")
        bad = int((~torch.isfinite(image.as_tensor().float())).sum()) if image.is_floating_point() else 0
        if bad:
            raise ScanError(f"{source}: contains {bad:,} NaN or infinite voxel(s)")
        return image


def _is_colour_2d(image: MetaTensor) -> bool:
    """ITK reads an RGB(A) 2D file as ``(X, Y, colours)`` and says so in ``original_channel_dim``."""
    return image.ndim == 3 and image.meta.get("original_channel_dim") == -1 and image.shape[-1] in (3, 4)


def _as_single_slice(image: MetaTensor) -> MetaTensor:
    """A 2D image (``(X, Y)``, or ``(X, Y, colours)`` as ITK reads RGB files) as one gray slice
    ``(X, Y, 1)`` with a 3D affine (ITK's 2D affine gets a 1 mm through-plane axis); 3D inputs
    come back unchanged."""
    colour = _is_colour_2d(image)
    if image.ndim != 2 and not colour:
        return image
    plane = image.as_tensor()
    if colour:
        plane = plane[..., :3].float().mean(-1)
    affine = torch.as_tensor(image.affine, dtype=torch.float64).clone()
    if affine.shape == (3, 3):  # ITK's 2D affine; a 2D NIfTI already carries a 3D one
        affine2d, affine = affine, torch.eye(4, dtype=torch.float64)
        affine[:2, :2], affine[:2, 3] = affine2d[:2, :2], affine2d[:2, 2]
    meta = {k: v for k, v in image.meta.items() if k != "affine"}
    meta.update(original_channel_dim=float("nan"), spatial_shape=np.asarray([*plane.shape, 1]),
                original_affine=affine.clone(), spacing=np.asarray([*np.linalg.norm(affine[:2, :2].numpy(), axis=0), 1.0]))
    return MetaTensor(plane.unsqueeze(-1), affine=affine, meta=meta)


def _check_nifti_header(source: Path) -> None:
    """Refuse NIfTI headers that readers interpret differently (which of two disagreeing forms wins
    differs between nibabel, ITK versions and viewers; a zero or negative voxel size is replaced or
    mirrored depending on the reader) and voxel types no model reads, before any voxel is loaded."""
    try:  # the raw header: nibabel's load replaces a zero pixdim with 1 (and logs it)
        with nib.openers.ImageOpener(source) as stream:
            block = stream.read(nib.Nifti2Header.template_dtype.itemsize)
    except Exception as error:
        raise ScanError(f"{source}: cannot be read as an image ({first_line(error)})") from None
    kinds = [k for k in (nib.Nifti1Header, nib.Nifti2Header) if k.may_contain_header(block)]
    if not kinds:
        raise ScanError(f"{source}: cannot be read as an image (no NIfTI-1 or NIfTI-2 header)")
    header = kinds[0](block[:kinds[0].template_dtype.itemsize], check=False)
    dtype = header.get_data_dtype()
    if dtype.names is not None:
        raise ScanError(f"{source}: holds RGB(A) voxels ({dtype}); give a gray-scale volume")
    if dtype.kind == "c":
        raise ScanError(f"{source}: holds complex-valued voxels ({dtype}); give magnitude images")
    shape = header.get_data_shape()
    if 0 in shape:
        raise ScanError(f"{source}: has an empty axis (shape {tuple(int(n) for n in shape)}); it holds no voxels")
    sizes = [float(v) for v in header["pixdim"][1:1 + min(3, len(shape))]]
    if 0 in sizes:
        raise ScanError(f"{source}: a voxel size (pixdim) is zero ({sizes}); the scan cannot be placed in space")
    if any(v < 0 for v in sizes):
        raise ScanError(f"{source}: negative voxel size in pixdim ({sizes}); readers mirror "
                        "or keep such axes differently, so fix the header (e.g. with nibabel) first")
    sform, sform_code = header.get_sform(coded=True)
    qform, qform_code = header.get_qform(coded=True)
    if sform_code and qform_code:
        apart = float(np.abs(np.asarray(sform) - np.asarray(qform)).max())
        if apart > 1e-3:
            raise ScanError(f"{source}: its qform and sform disagree (affine entries up to {apart:.3g} apart); readers "
                            "and viewers differ in which one places the scan, so make them agree first")


@contextlib.contextmanager
def _geometry_errors(source: Path):
    """Turn DICOM geometry problems into ScanErrors that name the input."""
    try:
        yield
    except DicomGeometryError as error:
        raise ScanError(f"{source}: {error}") from None


def _meta_tensor(volume: np.ndarray, affine: np.ndarray, source: Path) -> MetaTensor:
    """A MetaTensor with the metadata MONAI's own readers attach (RAS affine, no channel axis)."""
    affine = torch.as_tensor(affine, dtype=torch.float64)
    meta = {
        "filename_or_obj": str(source),
        "original_affine": affine.clone(),
        "spatial_shape": np.asarray(volume.shape),
        "original_channel_dim": float("nan"),
        "space": SpaceKeys.RAS,
    }
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(volume)), affine=affine, meta=meta)


#: What an in-memory volume is called in messages and tables when it has no file name.
IN_MEMORY = "<array>"


def in_memory_scan(volume, affine=None, name: str | None = None) -> MetaTensor:
    """A volume given in memory as a scan read from a file: a MetaTensor ``(X, Y, Z)`` with its voxel-to-world affine
    (RAS, mm: nibabel's convention) and the metadata MONAI's readers attach.

    ``volume``: a numpy array or tensor with ``affine`` (4 x 4), or a MetaTensor (its own affine, unless ``affine``
    is given). A missing affine is an error, never a guess of 1 mm voxels: the models are spacing-aware.
    """
    if isinstance(volume, MetaTensor):
        affine = volume.affine if affine is None else affine
        name = name or volume.meta.get("filename_or_obj") or IN_MEMORY
        volume = volume.as_tensor()
    elif affine is None:
        raise ScanError("an array needs its affine (4 x 4 voxel-to-world, RAS, mm), e.g. nibabel's image.affine")
    affine = np.asarray(convert_to_numpy(affine), dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ScanError(f"{name or IN_MEMORY}: the affine must be a finite, invertible 4 x 4 matrix, got shape {affine.shape}")
    array = np.asarray(convert_to_numpy(volume))
    return _meta_tensor(array, affine, Path(str(name or IN_MEMORY)))


def _with_dicom_meta(image: MetaTensor, header: pydicom.Dataset) -> MetaTensor:
    image.meta["SeriesInstanceUID"] = str(header.get("SeriesInstanceUID", ""))
    image.meta["Modality"] = str(header.get("Modality", ""))
    return image


class LoadScand(MapTransform):
    """Dictionary version of :class:`LoadScan` (for bundle configs, in place of ``LoadImaged``)."""

    def __init__(self, keys: KeysCollection, series_uid: str | None = None, max_gib: float | None = None,
                 allow_2d: bool = False, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadScan(series_uid, max_gib, allow_2d)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d
