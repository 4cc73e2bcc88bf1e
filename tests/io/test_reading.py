"""LoadScan on real files, folders and archives, and the bad-input corpus with its messages."""

import os
import re
import zipfile

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import ITKReader
from monai.transforms import LoadImage
from pydicom.data import get_testdata_file

import medfm
from medfm.io import ArchiveError, LoadScan, LoadScand, ScanError, list_dicom_series, safe_extract_zip

from .bad_inputs import CORPUS, ct_series

PYDICOM_CT_SERIES = os.path.join(os.path.dirname(get_testdata_file("CT_small.dcm")), "dicomdirtests", "98892001", "CT5N")


@pytest.fixture
def series(small_ct, tmp_path):
    """A real CT crop (64x48x40) written as a 40-file DICOM series."""
    return ct_series(small_ct, tmp_path)[0].parent


def _positions(folder):
    return sorted(folder.iterdir())


def test_nifti_and_its_dicom_series_load_identically(small_ct, series, caplog):
    from_nifti = LoadScan()(str(small_ct))
    with caplog.at_level("WARNING", logger="medfm.io.reading"):
        from_dicom = LoadScan()(str(series))
    assert "pydicom instead" not in caplog.text, "ITK reads an ordinary series itself"
    np.testing.assert_array_equal(from_nifti.numpy(), from_dicom.numpy())
    np.testing.assert_allclose(from_nifti.affine.numpy(), from_dicom.affine.numpy(), atol=1e-4)
    assert from_dicom.meta["filename_or_obj"] == str(series)
    assert from_dicom.meta["SeriesInstanceUID"] == pydicom.dcmread(_positions(series)[0]).SeriesInstanceUID


def test_real_ct_series_shipped_with_pydicom():
    image = LoadScan()(PYDICOM_CT_SERIES)
    reference = LoadImage(reader="ITKReader", image_only=True)(PYDICOM_CT_SERIES)
    assert image.shape == (16, 16, 5)
    np.testing.assert_array_equal(image.numpy(), reference.numpy())
    assert abs(float(image.affine[2, 2]) - 2.5) < 1e-6


def test_zip_of_a_series_loads_and_leaves_nothing_behind(series, small_ct, tmp_path):
    archive = tmp_path / "scan.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in _positions(series):
            bundle.write(path, f"export/{path.name}")
    image = LoadScan()(str(archive))
    np.testing.assert_array_equal(image.numpy(), LoadScan()(str(small_ct)).numpy())
    assert image.meta["filename_or_obj"] == str(archive)


@pytest.mark.parametrize("member", ["../escaped.dcm", "/tmp/absolute_escape.dcm", "a/../../escaped.dcm"])
def test_archive_members_escaping_the_folder_are_refused(tmp_path, member):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr(member, b"payload")
    target = tmp_path / "extract"
    target.mkdir()
    with pytest.raises(ArchiveError, match=r"evil\.zip: refused: archive member .* would be written outside"):
        safe_extract_zip(archive, target)
    assert not (tmp_path / "escaped.dcm").exists() and list(target.iterdir()) == []
    with pytest.raises(ScanError, match="refused"):
        LoadScan()(str(archive))


def test_symlink_members_are_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        info = zipfile.ZipInfo("series/link.dcm")
        info.external_attr = (0o120777 << 16)
        bundle.writestr(info, "/etc/passwd")
    with pytest.raises(ArchiveError, match="is a symbolic link"):
        safe_extract_zip(archive, tmp_path / "out")


def test_a_member_named_twice_and_a_zip_bomb_within_the_budget_are_refused_before_unpacking(tmp_path):
    twice = tmp_path / "twice.zip"
    with zipfile.ZipFile(twice, "w") as bundle, pytest.warns(UserWarning, match="Duplicate name"):
        bundle.writestr("series/1.dcm", b"first")
        bundle.writestr("series/1.dcm", b"second")
    with pytest.raises(ArchiveError, match=r"twice\.zip: refused: archive member 'series/1\.dcm' appears twice"):
        safe_extract_zip(twice, tmp_path / "twice")
    assert not (tmp_path / "twice").exists()
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        with bundle.open("series/1.dcm", "w", force_zip64=True) as member:
            for _ in range(200):
                member.write(bytes(2**20))  # 200 MiB of zeros deflate to about 200 kB
    with pytest.raises(ArchiveError, match=r"bomb\.zip: refused: 0\.2 MiB would expand to 0\.20 GiB \(\d+ times.*a zip bomb"):
        safe_extract_zip(bomb, tmp_path / "bomb")
    assert not (tmp_path / "bomb").exists()


def test_several_series_are_listed_and_one_can_be_chosen(tmp_path):
    folder = tmp_path / "study"
    medfm.samples.write_dicom_series("ct_head", folder / "ct")
    medfm.samples.write_dicom_series("mr_head_t1", folder / "mr")
    found = {s.modality: s for s in list_dicom_series(folder)}
    assert {m: len(s.files) for m, s in found.items()} == {"CT": 75, "MR": 62}
    with pytest.raises(ScanError) as info:
        LoadScan()(str(folder))
    message = str(info.value)
    assert message.startswith(f"{folder}: 2 DICOM series, choose one with series_uid: ")
    assert found["CT"].uid in message and "(MR, " in message and "62 files" in message and "\n" not in message
    chosen = LoadScand("image", series_uid=found["MR"].uid)({"image": str(folder)})["image"]
    assert chosen.shape == (128, 128, 62)
    np.testing.assert_array_equal(chosen.numpy(), LoadScan()(str(folder / "mr")).numpy())
    with pytest.raises(ScanError, match=r"no series 1\.2\.3; found: "):
        LoadScan(series_uid="1.2.3")(str(folder))


@pytest.mark.parametrize("case", list(CORPUS))
def test_bad_input_corpus(case, small_ct, tmp_path, real_file):
    path, expected = CORPUS[case](small_ct, tmp_path, real_file)
    with pytest.raises(ScanError) as info:
        LoadScan()(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert re.search(expected, message), message


def test_missing_input():
    with pytest.raises(ScanError, match=r"absent\.nii\.gz: no such file or folder"):
        LoadScan()("absent.nii.gz")


def test_memory_is_estimated_before_loading(small_ct, series, monkeypatch):
    with pytest.raises(ScanError, match=r"needs about 0\.0 GiB as float32 \(122,880 voxels\), over the 0\.0001 GiB limit; "
                                        r"set MEDFM_MAX_INPUT_GIB to raise it"):
        LoadScan(max_gib=0.0001)(str(small_ct))
    monkeypatch.setenv("MEDFM_MAX_INPUT_GIB", "0.0001")
    with pytest.raises(ScanError, match="over the 0.0001 GiB limit"):
        LoadScan()(str(series))
    monkeypatch.setenv("MEDFM_MAX_INPUT_GIB", "1")
    assert LoadScan()(str(series)).shape == (64, 48, 40)


def test_enhanced_ct_file_matches_itk():
    """Real Enhanced CT (pydicom-data): geometry from its functional groups, HU after rescale."""
    path = get_testdata_file("eCT_Supplemental.dcm")
    image = LoadScan()(path)
    reference = LoadImage(reader="ITKReader", image_only=True)(path)
    assert image.shape == (512, 512, 2) and image.meta["Modality"] == "CT"
    np.testing.assert_array_equal(image.numpy(), reference.numpy())
    np.testing.assert_allclose(image.affine.numpy(), reference.affine.numpy(), atol=1e-4)
    assert abs(float(image.affine[2, 2]) - 10.0) < 1e-6 and int(image.min()) == -1024


def test_siemens_mosaic_is_unpacked_into_slices(real_file):
    image = LoadScan()(str(real_file("siemens_mosaic_mr")))
    assert image.shape == (64, 64, 35) and image.meta["Modality"] == "MR"
    spacing = np.linalg.norm(image.affine.numpy()[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, [3.25, 3.25, 3.6], atol=0.01)
    assert float(image.float().std()) > 0  # 35 distinct slices, not one tile repeated or blank


def test_metaimage_with_separate_voxel_file(real_file):
    header = real_file("itk_pd_mha")
    real_file("itk_pd_mha_raw")
    image = LoadScan()(str(header))
    assert image.shape == (181, 217, 3) and image.dtype == torch.uint8


def test_series_itk_cannot_read_falls_back_to_pydicom(monkeypatch, caplog):
    expected = LoadScan()(PYDICOM_CT_SERIES)

    class BrokenITKReader(ITKReader):
        def get_data(self, img):
            raise RuntimeError("GDCM could not decode the pixel data")

    monkeypatch.setattr(medfm.io.reading, "ITKReader", BrokenITKReader)
    with caplog.at_level("WARNING", logger="medfm.io.reading"):
        image = LoadScan()(PYDICOM_CT_SERIES)
    assert "cannot be read as an image (GDCM could not decode the pixel data); reading it with pydicom instead" in caplog.text
    np.testing.assert_array_equal(image.numpy(), expected.numpy())
    np.testing.assert_allclose(image.affine.numpy(), expected.affine.numpy(), atol=1e-4)
    assert image.meta["SeriesInstanceUID"] == expected.meta["SeriesInstanceUID"]


def test_a_reader_fallback_reaches_the_user_of_medfm_embed(monkeypatch, capsys, tmp_path):
    """Warnings of every medfm module are printed, not only the input contract's."""
    from tests.conftest import GENESIS

    class BrokenITKReader(ITKReader):
        def get_data(self, img):
            raise RuntimeError("GDCM could not decode the pixel data")

    monkeypatch.setattr(medfm.io.reading, "ITKReader", BrokenITKReader)
    summary = medfm.embed(GENESIS, [PYDICOM_CT_SERIES], out=tmp_path / "out", progress=False, num_workers=0)
    assert summary.processed == 1
    fallback = [line for line in capsys.readouterr().err.splitlines() if "reading it with pydicom instead" in line]
    assert len(fallback) == 1 and fallback[0].startswith(f"medfm: warning: {PYDICOM_CT_SERIES}")


def test_big_endian_nifti_loads_with_its_values(tmp_path):
    from nibabel.testing import data_path

    source = os.path.join(data_path, "anatomical.nii")  # a real big-endian file from nibabel's tests
    expected = np.asarray(nib.load(source).dataobj)
    assert nib.load(source).header.endianness == ">"
    image = LoadScan()(source)
    np.testing.assert_array_equal(image.numpy(), expected)


def test_integer_rescaling_widens_instead_of_overflowing():
    from medfm.io.dicom import _rescaled

    stored = np.array([[60000, 1]], dtype=np.uint16)
    assert _rescaled(stored, np.array([100000.0]), np.array([0.0])).tolist() == [[6_000_000_000, 100_000]]
    assert _rescaled(stored, np.array([1.0]), np.array([-1024.0])).dtype == np.int32


@pytest.mark.parametrize("name", ["itk_pd_slice_png", "itk_t1_slice_png", "itk_sagittal_slice_png"])
def test_2d_images_load_as_one_gray_slice_when_allowed(real_file, name):
    path = real_file(name)
    with pytest.raises(ScanError, match=rf"{re.escape(str(path))}: is a 2D image"):
        LoadScan()(path)
    image = LoadScan(allow_2d=True)(path)
    reference = LoadImage(image_only=True, reader="PILReader")(path)  # (cols, rows[, colours]) as MONAI reads it
    expected = reference.float().mean(-1) if reference.ndim == 3 else reference.float()
    assert image.shape == (*expected.shape, 1) and image.affine.shape == (4, 4)
    torch.testing.assert_close(image[..., 0].float(), expected)


def test_a_single_dicom_slice_loads_with_its_geometry_when_2d_is_allowed():
    path = get_testdata_file("CT_small.dcm")
    with pytest.raises(ScanError, match="single 2D DICOM slice"):
        LoadScan()(path)
    image = LoadScan(allow_2d=True)(path)
    header = pydicom.dcmread(path)
    assert image.shape == (128, 128, 1) and image.meta["Modality"] == "CT"
    hu = header.pixel_array.astype(np.float64) * float(header.RescaleSlope) + float(header.RescaleIntercept)
    np.testing.assert_array_equal(image[..., 0].numpy().T, hu)  # (column, row) order
    np.testing.assert_allclose(np.abs(np.diag(image.affine.numpy()))[:2], [float(v) for v in header.PixelSpacing])


def test_a_2d_nifti_keeps_its_own_affine(tmp_path):
    affine = np.diag([0.5, 0.7, 3.0, 1.0])
    affine[:3, 3] = [1, 2, 3]
    plane = np.random.default_rng(0).random((20, 30), dtype=np.float32)
    nib.save(nib.Nifti1Image(plane, affine), tmp_path / "slice.nii.gz")
    image = LoadScan(allow_2d=True)(tmp_path / "slice.nii.gz")
    assert image.shape == (20, 30, 1)
    np.testing.assert_allclose(image.affine.numpy(), affine)
    np.testing.assert_array_equal(image[..., 0].numpy(), plane)


def test_a_zipped_series_that_unpacks_beyond_the_limit_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_MAX_UNPACKED_GIB", "0.01")
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("slice.dcm", bytes(64 << 20))
    with pytest.raises(ScanError, match=r"bomb\.zip: refused: its members unpack to 0\.06 GiB, over the 0\.01 GiB limit "
                                        r"\(\$MEDFM_MAX_UNPACKED_GIB\)$"):
        LoadScan()(bomb)


def test_per_slice_rescale_keeps_every_slices_values(series):
    """Slices 0-19 stored with slope 1, slices 20-39 with slope 0.01: ITK would keep int16 and truncate 4.74 to 4."""
    files = sorted(series.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    reference = LoadScan()(series)
    for path in files[len(files) // 2:]:
        dataset = pydicom.dcmread(path)
        dataset.RescaleSlope, dataset.RescaleIntercept = 0.01, 0
        dataset.save_as(path)
    image = LoadScan()(series)
    assert image.dtype == torch.float32
    stored = reference.as_tensor().float() - float(pydicom.dcmread(files[0]).RescaleIntercept)
    half = image.shape[2] // 2
    torch.testing.assert_close(image[..., :half], reference[..., :half].float(), check_dtype=False)
    torch.testing.assert_close(image[..., half:], stored[..., half:] * 0.01, rtol=1e-5, atol=1e-4, check_dtype=False)
    assert not torch.equal(image[..., half:], image[..., half:].round())
