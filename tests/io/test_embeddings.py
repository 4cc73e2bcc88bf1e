import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medfm.io import SaveEmbedding, SaveEmbeddingd, input_stem, output_stem, read_index_rows
from medfm.errors import MedfmError
from medfm.io.embeddings import (INDEX_COLUMNS, append_index_rows, check_index_file, embedding_file_name, index_row,
                                 is_index_file, write_index_rows)
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
    SaveEmbeddingd("f", tmp_path / "out", index_file=None)({"f": pooled, "image": image})
    name = f"{output_stem('/data/case_7.nii.gz')}_embedding.npy"
    saved = np.load(tmp_path / "out" / name)
    assert saved.dtype == np.float32 and saved.tolist() == [5.5, 17.5]
    assert [p.name for p in (tmp_path / "out").iterdir()] == [name]


def test_index_gets_one_row_per_saved_embedding(tmp_path):
    saver = SaveEmbeddingd("f", tmp_path, model="some_bundle", weights="w1")
    for name, uid in (("a.nii.gz", None), ("series_dir", "1.2.3")):
        meta = {"filename_or_obj": f"/data/{name}"} | ({"SeriesInstanceUID": uid} if uid else {})
        saver({"f": torch.ones(4), "image": MetaTensor(torch.zeros(1, 2, 2, 2), meta=meta)})
    rows = read_index_rows(tmp_path / "embeddings.csv")
    whole_scan = {"region": "", "center_x": "", "center_y": "", "center_z": ""}
    assert rows == [
        {"input": "/data/a.nii.gz", "series_uid": "", **whole_scan, "model": "some_bundle", "weights": "w1",
         "embedding": embedding_file_name("/data/a.nii.gz"), "dimension": "4"},
        {"input": "/data/series_dir", "series_uid": "1.2.3", **whole_scan, "model": "some_bundle", "weights": "w1",
         "embedding": embedding_file_name("/data/series_dir"), "dimension": "4"},
    ]


def test_errors():
    with pytest.raises(ValueError, match="expected a"):
        GlobalAveragePool()(torch.zeros(3))
    with pytest.raises(ValueError, match="carries no filename_or_obj"):
        SaveEmbeddingd("f", "/tmp")({"f": torch.zeros(2), "image": torch.zeros(1)})


def test_array_saver_returns_the_path(tmp_path):
    path = SaveEmbedding(tmp_path, postfix="vec")(np.arange(3), "/scans/series_12/")
    assert path == tmp_path / embedding_file_name("/scans/series_12/", postfix="vec") and np.load(path).dtype == np.float32


def test_parquet_index_appends_typed_rows(tmp_path):
    saver = SaveEmbeddingd("f", tmp_path, index_file="embeddings.parquet", model="m", weights="w")
    for name in ("a.nii.gz", "b.nii.gz"):
        saver({"f": torch.ones(3), "image": MetaTensor(torch.zeros(1, 2, 2, 2), meta={"filename_or_obj": f"/d/{name}"})})
    rows = read_index_rows(tmp_path / "embeddings.parquet")
    assert [(r["input"], r["embedding"], r["dimension"]) for r in rows] == [
        ("/d/a.nii.gz", embedding_file_name("/d/a.nii.gz"), 3), ("/d/b.nii.gz", embedding_file_name("/d/b.nii.gz"), 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([r["embedding"] for r in rows] + ["embeddings.parquet"])


@pytest.mark.parametrize("name", ["embeddings.csv", "embeddings.parquet"])
def test_index_files_are_recognised_by_their_columns(tmp_path, name):
    append_index_rows(tmp_path / name, [dict.fromkeys(INDEX_COLUMNS, "x") | {"dimension": 2}])
    assert is_index_file(tmp_path / name)
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    assert not is_index_file(tmp_path / "other.csv") and not is_index_file(tmp_path / "scan.nii.gz")


def test_embedding_file_names_differ_for_inputs_of_one_base_name():
    names = {embedding_file_name(path) for path in ("/a/ct.nii.gz", "/b/ct.nii.gz", "/c/ct", "/c/ct.zip")}
    assert len(names) == 4 and all(name.startswith("ct-") and name.endswith("_embedding.npy") for name in names)
    assert embedding_file_name("/a/ct.nii.gz") == embedding_file_name("/a/ct.nii.gz")
    assert embedding_file_name("/a/ct.nii.gz", "point:1") != embedding_file_name("/a/ct.nii.gz")


@pytest.mark.parametrize("name", ["embeddings.csv", "embeddings.parquet"])
def test_written_index_reads_back_and_a_foreign_file_is_refused(tmp_path, name):
    rows = [index_row("/d/a.nii.gz", "", "m", "w", "a.npy", 3), index_row("/d/b", "1.2", "m", "w", "b.npy", 3,
                                                                        region="point:7", center_lps=(1.0, -2.5, 30.25))]
    write_index_rows(tmp_path / name, rows)
    back = read_index_rows(tmp_path / name)
    assert [r["center_y"] for r in back] == ["", "-2.500"] and [int(r["dimension"]) for r in back] == [3, 3]
    check_index_file(tmp_path / name)
    (tmp_path / "mine.csv").write_text("input,label\nx,1\n")
    with pytest.raises(MedfmError, match="mine.csv: exists and is not a medfm embeddings index"):
        check_index_file(tmp_path / "mine.csv")
