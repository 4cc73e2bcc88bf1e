import json
import shutil

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from medfm.io import OutputLayout, SaveDescribedImage, SaveDescribedImaged
from medfm.weights import sha256_of, weights_description
from tests.conftest import BUNDLES


def _image(affine):
    return MetaTensor(torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4),
                      meta={"filename_or_obj": "scan.nii.gz", "affine": torch.as_tensor(affine)})


def _descrip(path):
    return nib.load(path).header["descrip"].tobytes().rstrip(b"\0").decode()


def test_both_forms_write_the_description_into_the_header_and_keep_data_and_geometry(tmp_path):
    affine = np.diag([0.5, 0.7, 2.0, 1.0])
    affine[:3, 3] = (10, -20, 5)
    SaveDescribedImage("made by the array form", folder_layout=OutputLayout(tmp_path, "a"), output_dtype=np.int16,
                       separate_folder=False, resample=False)(_image(affine))
    SaveDescribedImaged("image", description="made by the dictionary form", folder_layout=OutputLayout(tmp_path, "d"),
                        output_dtype=np.int16, separate_folder=False, resample=False)({"image": _image(affine)})
    (array_file,), (dict_file,) = sorted(tmp_path.glob("*_a.nii.gz")), sorted(tmp_path.glob("*_d.nii.gz"))
    assert _descrip(array_file) == "made by the array form" and _descrip(dict_file) == "made by the dictionary form"
    for path in (array_file, dict_file):
        written = nib.load(path)
        assert written.get_data_dtype() == np.int16
        np.testing.assert_allclose(written.affine, affine, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(written.dataobj), np.arange(24).reshape(2, 3, 4))


def test_a_long_description_is_cut_to_the_80_bytes_of_the_field(tmp_path):
    SaveDescribedImage("x" * 100, folder_layout=OutputLayout(tmp_path, "a"), separate_folder=False,
                       resample=False)(_image(np.eye(4)))
    assert _descrip(next(tmp_path.glob("*.nii.gz"))) == "x" * 80


def test_the_description_names_bundle_version_and_the_weights_the_run_loads(tmp_path):
    def version(bundle):
        return json.loads((BUNDLES / bundle / "configs" / "metadata.json").read_text())["version"]

    genesis = BUNDLES / "models_genesis_chest_ct"
    installed = genesis / "models" / "model.pt"
    assert weights_description(genesis, installed) == \
        f"DEMO: medfm models_genesis_chest_ct {version('models_genesis_chest_ct')}, weights medfm_genesis_demo"
    copy = tmp_path / "elsewhere.pt"
    shutil.copyfile(installed, copy)  # the same file under another ckpt_path: still known by its sha256
    assert weights_description(genesis, copy).endswith("weights medfm_genesis_demo")
    other = tmp_path / "other.pt"
    other.write_bytes(b"other weights")
    assert weights_description(genesis, other).endswith(f"weights unregistered:{sha256_of(other)[:16]}")
    assert weights_description(genesis, None).endswith("weights none")  # random initialisation
    mt = BUNDLES / "medical_transformer_brain_mri"
    assert weights_description(mt, mt / "models" / "model.pt") == (
        f"medfm medical_transformer_brain_mri {version('medical_transformer_brain_mri')}, "
        "weights medfm_medical_transformer_brain_t1")


def test_a_cut_at_80_bytes_never_splits_a_character(tmp_path):
    SaveDescribedImage("é" * 50, folder_layout=OutputLayout(tmp_path, "a"), separate_folder=False,
                       resample=False)(_image(np.eye(4)))
    assert _descrip(next(tmp_path.glob("*.nii.gz"))) == "é" * 40
