import nibabel as nib
import numpy as np
import pydicom
import pytest
from monai.transforms import LoadImage

import medfm


@pytest.mark.parametrize("name", sorted(medfm.samples.SAMPLES))
@pytest.mark.parametrize("reader", ["ITKReader", "PydicomReader"])
def test_dicom_series_round_trip_keeps_voxels_and_geometry(name, reader, tmp_path):
    files = medfm.samples.write_dicom_series(name, tmp_path / name)
    original = LoadImage(reader="ITKReader", image_only=True)(medfm.samples.path(name))
    series = LoadImage(reader=reader, image_only=True)(str(tmp_path / name))
    assert len(files) == original.shape[2]
    assert series.shape == original.shape
    np.testing.assert_array_equal(series.numpy(), original.numpy())
    np.testing.assert_allclose(series.affine.numpy(), original.affine.numpy(), atol=1e-4)
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert header.Modality == medfm.samples.SAMPLES[name][1]
    assert len({pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in files}) == 1


def test_samples_are_real_volumes_with_documented_shapes():
    ct = nib.load(medfm.samples.path("ct_head"))
    mr = nib.load(medfm.samples.path("mr_head_t1"))
    assert ct.shape == (71, 87, 75) and np.allclose(ct.header.get_zooms(), 2.0)
    assert mr.shape == (128, 128, 62) and np.allclose(mr.header.get_zooms(), (2, 2, 3))
    assert (medfm.samples.directory() + "/README.md")
    with pytest.raises(KeyError, match="available: ct_head, mr_head_t1"):
        medfm.samples.path("chest")


def test_writer_rejects_non_integer_volumes(tmp_path):
    path = tmp_path / "float.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(4, 4, 4).astype(np.float32), np.eye(4)), path)
    with pytest.raises(ValueError, match="float.nii.gz: values must be integers"):
        medfm.samples.write_dicom_series(str(path), tmp_path / "out")
