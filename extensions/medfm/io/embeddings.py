"""Writing per-volume embeddings as ``.npy`` files named after their input."""

from __future__ import annotations

import csv
import os
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils.type_conversion import convert_data_type

from ..errors import MedfmError
from .atomic import atomic_path

__all__ = ["SaveEmbedding", "SaveEmbeddingd", "append_index_rows", "input_meta", "input_stem", "is_index_file", "read_index_rows"]

_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm", ".zip", ".png", ".jpg", ".jpeg", ".tif", ".tiff")


def input_stem(path: str | os.PathLike) -> str:
    """Base name of an input file or DICOM folder without its image suffix (``ct.nii.gz`` -> ``ct``)."""
    name = Path(str(path).rstrip("/\\")).name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def input_meta(data: Mapping[Hashable, object], source_key: str, owner: str) -> dict:
    """Metadata of the loaded input under ``source_key``, which outputs are named after."""
    source = data.get(source_key)
    if not isinstance(source, MetaTensor) or "filename_or_obj" not in source.meta:
        raise ValueError(f"{owner}: '{source_key}' carries no filename_or_obj to name the output after")
    return source.meta


class SaveEmbedding:
    """Save a vector as ``<output_dir>/<input stem>_<postfix>.npy`` (float32), named after its input.

    The file is written under a temporary name and renamed, so a failed run leaves no truncated
    ``.npy``. Returns the path written.
    """

    def __init__(self, output_dir: str | os.PathLike, postfix: str = "embedding") -> None:
        self.output_dir = Path(output_dir)
        self.postfix = postfix

    def __call__(self, embedding, source: str | os.PathLike) -> Path:
        vector = convert_data_type(embedding, np.ndarray, dtype=np.float32)[0]
        target = self.output_dir / f"{input_stem(source)}_{self.postfix}.npy"
        with atomic_path(target) as temporary:
            with open(temporary, "wb") as stream:  # a path would get ".npy" appended
                np.save(stream, vector, allow_pickle=False)
        return target


class SaveEmbeddingd(MapTransform):
    """Dictionary version of :class:`SaveEmbedding`, which also indexes what it wrote.

    The input path is the ``filename_or_obj`` meta entry of ``source_key`` (the loaded image),
    whatever produced the vector. With ``index_file`` set, each saved vector adds a row to
    ``<output_dir>/<index_file>`` (columns input, series_uid, model, weights, embedding, dimension;
    CSV, or Parquet when the name ends in ``.parquet``), so embeddings of many scans can be joined with other tables later.
    """

    def __init__(self, keys: KeysCollection, output_dir: str | os.PathLike, source_key: str = "image",
                 postfix: str = "embedding", index_file: str | None = "embeddings.csv", model: str = "",
                 weights: str = "", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.source_key = source_key
        self.saver = SaveEmbedding(output_dir, postfix)
        self.index = Path(output_dir) / index_file if index_file else None
        self.model = model
        self.weights = weights

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        meta = input_meta(d, self.source_key, type(self).__name__)
        for key in self.key_iterator(d):
            path = self.saver(d[key], meta["filename_or_obj"])
            if self.index is not None:
                row = {"input": str(meta["filename_or_obj"]), "series_uid": str(meta.get("SeriesInstanceUID", "")),
                       "model": self.model, "weights": self.weights, "embedding": path.name,
                       "dimension": int(np.prod(np.shape(d[key])))}
                append_index_rows(self.index, [row])
        return d


INDEX_COLUMNS = ("input", "series_uid", "model", "weights", "embedding", "dimension")


def _is_parquet(index: Path) -> bool:
    return index.suffix.lower() == ".parquet"


def _parquet():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise MedfmError("a .parquet embeddings index needs pyarrow: pip install 'medfm[parquet]', "
                         "or name the index .csv") from None
    return pyarrow


def append_index_rows(index: str | os.PathLike, rows: list[dict]) -> None:
    """Append rows to an embeddings index: CSV, or Parquet when the name ends in ``.parquet``.

    A CSV gets its header when new; a Parquet file is rewritten whole (atomically) with the rows added.
    """
    index = Path(index)
    index.parent.mkdir(parents=True, exist_ok=True)
    if _is_parquet(index):
        pyarrow = _parquet()
        table = pyarrow.Table.from_pylist([{column: row[column] for column in INDEX_COLUMNS} for row in rows])
        if index.exists():
            table = pyarrow.concat_tables([pyarrow.parquet.read_table(index), table.cast(pyarrow.parquet.read_schema(index))])
        with atomic_path(index) as temporary:
            pyarrow.parquet.write_table(table, temporary)
        return
    new = not index.exists()
    with open(index, "a", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=INDEX_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def is_index_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an embeddings index written by :func:`append_index_rows` (CSV or Parquet)."""
    path = Path(path)
    if _is_parquet(path):
        return list(_parquet().parquet.read_schema(path).names) == list(INDEX_COLUMNS)
    if path.suffix.lower() != ".csv":
        return False
    with open(path, newline="") as stream:
        return stream.readline().strip().split(",") == list(INDEX_COLUMNS)


def read_index_rows(index: str | os.PathLike) -> list[dict]:
    """Rows of an embeddings index (CSV values as strings, Parquet values typed) as dictionaries."""
    index = Path(index)
    if _is_parquet(index):
        return _parquet().parquet.read_table(index).to_pylist()
    with open(index, newline="") as stream:
        return list(csv.DictReader(stream))
