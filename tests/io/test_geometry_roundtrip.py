"""Round trips per reader: preprocess (reorient, resample, pad), invert, save; outputs land on the input's grid."""

import zipfile

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
from monai.data import ITKReader
from monai.transforms import Compose, DivisiblePadd, EnsureChannelFirstd, Invertd, Orientationd, Spacingd
from pydicom.data import get_testdata_file

import medfm
from medfm.io import LoadScand, SaveSegmentation, SaveSegmentationd, SegmentationWriteError, output_stem
from medfm.io.dicom import LPS_TO_RAS, read_mosaic
from medfm.io.segmentation import corner_offset_mm

from .bad_inputs import ct_series

TOLERANCE_MM = 1e-4


def _itk_reference(path):
    reader = ITKReader()
    volume, meta = reader.get_data(reader.read(str(path)))
    return np.asarray(volume), np.asarray(meta["affine"], float)


def _nibabel_reference(path):
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine


def _series_folder(small_ct, tmp_path):
    folder = ct_series(small_ct, tmp_path)[0].parent
    return folder, _itk_reference(folder)


def _zipped_series(small_ct, tmp_path):
    folder, reference = _series_folder(small_ct, tmp_path)
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in sorted(folder.iterdir()):
            bundle.write(path, f"export/{path.name}")
    return archive, reference


def _nrrd(small_ct, tmp_path):
    import itk

    target = tmp_path / "ct.nrrd"
    itk.imwrite(itk.imread(str(small_ct)), str(target))
    return target, _itk_reference(target)


def _mosaic(real_file):
    path = real_file("siemens_mosaic_mr")
    volume, affine = read_mosaic(path)  # nibabel's unpacking, checked against its own affine below
    from nibabel.nicom import dicomwrappers

    wrapper = dicomwrappers.wrapper_from_file(str(path))
    np.testing.assert_array_equal(volume, np.asarray(wrapper.get_data()).transpose(1, 0, 2))
    return path, (volume, affine)


INPUTS = {
    "nifti": lambda small_ct, tmp_path, real_file: (small_ct, _nibabel_reference(small_ct)),
    "nrrd": lambda small_ct, tmp_path, real_file: _nrrd(small_ct, tmp_path),
    "mha": lambda small_ct, tmp_path, real_file: (real_file("itk_pd_mha"), (real_file("itk_pd_mha_raw"),
                                                                            _itk_reference(real_file("itk_pd_mha")))[1]),
    "dicom_series": lambda small_ct, tmp_path, real_file: _series_folder(small_ct, tmp_path),
    "dicom_zip": lambda small_ct, tmp_path, real_file: _zipped_series(small_ct, tmp_path),
    "enhanced_ct": lambda small_ct, tmp_path, real_file: (get_testdata_file("eCT_Supplemental.dcm"),
                                                          _itk_reference(get_testdata_file("eCT_Supplemental.dcm"))),
    "siemens_mosaic": lambda small_ct, tmp_path, real_file: _mosaic(real_file),
}


def _run_round_trip(path, output_dir, threshold=None, labels=("background", "bright")):
    """Preprocess like a bundle, threshold in model space, invert, save; returns the written paths."""
    preprocess = Compose([
        LoadScand("image"),
        EnsureChannelFirstd("image", channel_dim="no_channel"),
        Orientationd("image", axcodes="LPS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd("image", pixdim=(1.3, 1.7, 2.9), mode="bilinear"),
        DivisiblePadd("image", k=16),
    ])
    data = preprocess({"image": str(path)})
    image = data["image"].float()
    threshold = np.percentile(image.numpy(), 70) if threshold is None else threshold
    data["pred"] = (image > threshold).float()
    data = Invertd("pred", transform=preprocess, orig_keys="image", nearest_interp=True)(data)
    SaveSegmentationd("pred", output_dir, labels=list(labels), source_key="image")(data)
    return sorted(output_dir.iterdir())


@pytest.mark.parametrize("reader", list(INPUTS))
def test_segmentation_lands_on_the_input_grid(reader, small_ct, tmp_path, real_file):
    path, (reference_volume, reference_affine) = INPUTS[reader](small_ct, tmp_path, real_file)
    threshold = np.percentile(reference_volume.astype(np.float32), 70)
    written = _run_round_trip(path, tmp_path / "out", threshold)
    nifti = [p for p in written if p.name.endswith(".nii.gz")]
    assert len(nifti) == 1
    label = nib.load(nifti[0])
    assert label.shape == reference_volume.shape
    assert corner_offset_mm(label.affine, reference_affine, label.shape) < TOLERANCE_MM
    # the content lines up too: the mask made in model space matches the threshold applied to the input
    direct = reference_volume > threshold
    mask = np.asarray(label.dataobj) == 1
    dice = 2 * np.sum(mask & direct) / (mask.sum() + direct.sum())
    assert dice > 0.85, dice


@pytest.mark.parametrize("reader", ["dicom_series", "dicom_zip", "enhanced_ct"])
def test_dicom_seg_refers_to_the_source_and_matches_the_nifti(reader, small_ct, tmp_path, real_file):
    path, _ = INPUTS[reader](small_ct, tmp_path, real_file)
    written = _run_round_trip(path, tmp_path / "out")
    seg_path = next(p for p in written if p.suffix == ".dcm")
    nifti = nib.load(next(p for p in written if p.name.endswith(".nii.gz")))
    seg = hd.seg.segread(seg_path)
    sources = medfm.io.segmentation.source_datasets(path, seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    assert {s.SOPInstanceUID for s in sources} == {r.ReferencedSOPInstanceUID
                                                   for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["bright"]
    volume = seg.get_volume(combine_segments=True)
    # highdicom indexes (slice, row, column) into LPS; map its voxels into the NIfTI's (column, row, slice)
    to_nifti = np.linalg.inv(LPS_TO_RAS @ nifti.affine) @ volume.affine
    permutation = np.rint(to_nifti[:3, :3])
    assert np.abs(to_nifti[:3, :3] - permutation).max() < 1e-4
    assert np.abs(to_nifti[:3, 3] - np.rint(to_nifti[:3, 3])).max() < 1e-4
    indices = np.indices(volume.array.shape).reshape(3, -1)
    mapped = (permutation @ indices + np.rint(to_nifti[:3, 3])[:, None]).astype(int)
    np.testing.assert_array_equal(np.asarray(nifti.dataobj)[tuple(mapped)], volume.array.reshape(-1))


def test_segmentations_off_the_input_grid_or_unnamed_are_refused(small_ct, tmp_path):
    data = Compose([LoadScand("image"), EnsureChannelFirstd("image", channel_dim="no_channel"),
                    Spacingd("image", pixdim=(3.0, 3.0, 3.0))])({"image": str(small_ct)})
    with pytest.raises(SegmentationWriteError, match=r"ct_small\.nii\.gz: the segmentation \(shape \(1?.*is not on the "
                                                     r"input's grid .* invert the spatial preprocessing"):
        SaveSegmentation(tmp_path, ["background", "tissue"])((data["image"] > 0).float(), data["image"].meta)
    loaded = LoadScand("image")({"image": str(small_ct)})["image"]
    with pytest.raises(SegmentationWriteError, match=r"label values \[2\] have no name"):
        SaveSegmentation(tmp_path, ["background", "tissue"])((loaded > 0).int() + (loaded > 100).int(), loaded.meta)
    assert list(tmp_path.iterdir()) == []


def test_mosaic_input_gets_nifti_and_a_warning_instead_of_dicom_seg(real_file, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="medfm.io.segmentation"):
        written = _run_round_trip(real_file("siemens_mosaic_mr"), tmp_path / "out")
    assert [p.name for p in written] == [f"{output_stem(real_file('siemens_mosaic_mr'))}_seg.nii.gz"]
    assert "axasc35.dcm: no DICOM-SEG written: a Siemens mosaic packs many slices into one frame" in caplog.text


def test_dicom_seg_can_be_switched_off(small_ct, tmp_path):
    folder, _ = _series_folder(small_ct, tmp_path)
    loaded = LoadScand("image")({"image": str(folder)})["image"]
    written = SaveSegmentation(tmp_path / "out", {1: "tissue"}, dicom_seg=False)(loaded > 0, loaded.meta)
    assert [p.name for p in written] == [f"{output_stem(folder)}_seg.nii.gz"]
