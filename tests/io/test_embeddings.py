import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medfm.io import SaveEmbedding, SaveEmbeddingd, input_stem
from medfm.transforms import GlobalAveragePool, GlobalAveragePoold


@pytest.mark.parametrize("path, stem", [("/d/ct.nii.gz", "ct"), ("/d/scan.v2.nii", "scan.v2"), ("/d/series_1/", "series_1"), ("x.MHA", "x")])
def test_input_stem(path, stem):
    assert input_stem(path) == stem


def test_pool_and_save_embedding(tmp_path):
    features = MetaTensor(torch.arange(24.0).reshape(2, 3, 4))
    pooled = GlobalAveragePoold("f")({"f": features})["f"]
    torch.testing.assert_close(pooled, torch.tensor([5.5, 17.5]))
    assert not isinstance(pooled, MetaTensor)
    image = MetaTensor(torch.zeros(1, 2, 2, 2), meta={"filename_or_obj": "/data/case_7.nii.gz"})
    SaveEmbeddingd("f", tmp_path / "out")({"f": pooled, "image": image})
    saved = np.load(tmp_path / "out" / "case_7_embedding.npy")
    assert saved.dtype == np.float32 and saved.tolist() == [5.5, 17.5]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["case_7_embedding.npy"]


def test_errors():
    with pytest.raises(ValueError, match="expected a"):
        GlobalAveragePool()(torch.zeros(3))
    with pytest.raises(ValueError, match="carries no filename_or_obj"):
        SaveEmbeddingd("f", "/tmp")({"f": torch.zeros(2), "image": torch.zeros(1)})


def test_array_saver_returns_the_path(tmp_path):
    path = SaveEmbedding(tmp_path, postfix="vec")(np.arange(3), "/scans/series_12/")
    assert path == tmp_path / "series_12_vec.npy" and np.load(path).dtype == np.float32
