"""Writing per-volume embeddings as ``.npy`` files named after their input."""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
from monai.config import KeysCollection
from monai.data import FolderLayoutBase, MetaTensor
from monai.transforms import MapTransform
from monai.utils.type_conversion import convert_data_type

from ..errors import MedfmError
from .atomic import atomic_path
from .dicomweb import absolute_input
from .tables import read_table, table_columns, write_table

__all__ = ["INDEX_COLUMNS", "SaveEmbedding", "SaveEmbeddingd", "append_index_rows", "check_index_file", "embedding_file_name", "index_row",
           "input_meta", "input_stem", "is_index_file", "OutputLayout", "output_stem", "read_index_rows", "save_vector", "write_index_rows"]

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


def save_vector(target: str | os.PathLike, vector) -> Path:
    """Write ``vector`` as a float32 ``.npy`` at ``target``: under a temporary name, synced, then renamed,
    so a crash at any moment leaves either no file or the whole one."""
    target = Path(target)
    array = convert_data_type(vector, np.ndarray, dtype=np.float32)[0]
    with atomic_path(target) as temporary:
        with open(temporary, "wb") as stream:  # a path would get ".npy" appended
            np.save(stream, array, allow_pickle=False)
            stream.flush()
            os.fsync(stream.fileno())
    return target


class SaveEmbedding:
    """Save a vector as ``<output_dir>/<output stem>_<postfix>.npy`` (float32), named after its input (:func:`output_stem`).

    The file is written under a temporary name and renamed, so a failed run leaves no truncated
    ``.npy``. Returns the path written.
    """

    def __init__(self, output_dir: str | os.PathLike, postfix: str = "embedding") -> None:
        self.output_dir = Path(output_dir)
        self.postfix = postfix

    def __call__(self, embedding, source: str | os.PathLike) -> Path:
        return save_vector(self.output_dir / embedding_file_name(source, postfix=self.postfix), embedding)


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
                row = index_row(str(meta["filename_or_obj"]), str(meta.get("SeriesInstanceUID", "")), self.model,
                                self.weights, path.name, int(np.prod(np.shape(d[key]))))
                append_index_rows(self.index, [row])
        return d


#: Columns of an embeddings index. ``region`` is empty for a whole scan, ``point:<id>`` or
#: ``label:<value>`` for a region, whose crop centre is ``center_x/y/z`` (world mm, DICOM LPS).
INDEX_COLUMNS = ("input", "series_uid", "region", "center_x", "center_y", "center_z", "model", "weights", "embedding",
                 "dimension")


def index_row(input: str, series_uid: str, model: str, weights: str, embedding: str, dimension: int,
              region: str = "", center_lps: tuple[float, float, float] | None = None) -> dict:
    """One index row; ``center_lps`` in mm (empty cells for a whole scan)."""
    center = [f"{value:.3f}" for value in center_lps] if center_lps is not None else ["", "", ""]
    return {"input": input, "series_uid": series_uid, "region": region, "center_x": center[0], "center_y": center[1],
            "center_z": center[2], "model": model, "weights": weights, "embedding": embedding, "dimension": dimension}


def output_stem(source: str | os.PathLike, region: str = "") -> str:
    """``<input stem>-<10 hex digits>``: the start of every output file name medfm writes for an input.

    The digits hash the input's absolute path or URL (and region), so two inputs with the same base name
    (``a/ct.nii.gz``, ``b/ct.nii.gz``) or a folder and a zip of one name never share an output,
    the name still says which scan it came from, and every process of a distributed run derives
    the same name.
    """
    digest = hashlib.sha1(f"{absolute_input(source)}\0{region}".encode()).hexdigest()[:10]
    return f"{input_stem(source)}-{digest}"


def embedding_file_name(source: str | os.PathLike, region: str = "", postfix: str = "embedding") -> str:
    """``<output stem>_<postfix>.npy`` (see :func:`output_stem`), unique per (input path, region)."""
    return f"{output_stem(source, region)}_{postfix}.npy"


class OutputLayout(FolderLayoutBase):
    """MONAI ``SaveImage`` file naming by :func:`output_stem`: ``<output_dir>/<stem>-<digits>_<postfix><extension>``.

    MONAI's default layout names outputs after the input's base name alone (so ``a/ct.nii.gz`` and
    ``b/ct.nii.gz`` overwrite each other) and cuts anything after a dot in a folder's name.
    """

    def __init__(self, output_dir: str | os.PathLike, postfix: str, extension: str = ".nii.gz") -> None:
        self.output_dir = Path(output_dir)
        self.postfix = postfix
        self.extension = extension

    def filename(self, subject: str = "", idx=None, **kwargs) -> Path:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        patch = f"_{idx}" if idx is not None else ""
        return self.output_dir / f"{output_stem(subject)}_{self.postfix}{patch}{self.extension}"


def check_index_file(index: str | os.PathLike) -> None:
    """Raise :class:`MedfmError` if ``index`` exists but is not a medfm embeddings index (never append to it)."""
    index = Path(index)
    if index.exists() and not is_index_file(index):
        raise MedfmError(f"{index}: exists and is not a medfm embeddings index (its columns are not "
                         f"{', '.join(INDEX_COLUMNS)}); choose another --out folder or --index name")


def append_index_rows(index: str | os.PathLike, rows: list[dict]) -> None:
    """Append rows to an embeddings index: CSV, or Parquet when the name ends in ``.parquet``.

    A CSV gets its header when new; a Parquet file is rewritten whole (atomically) with the rows added.
    """
    index = Path(index)
    index.parent.mkdir(parents=True, exist_ok=True)
    if index.suffix.lower() == ".parquet":
        write_index_rows(index, read_table(index) + rows)
        return
    new = not index.exists()
    with open(index, "a", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=INDEX_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def write_index_rows(index: str | os.PathLike, rows: list[dict]) -> None:
    """Write a whole embeddings index (CSV or Parquet by its name) atomically from ``rows``."""
    write_table(index, INDEX_COLUMNS, rows, integer_columns=("dimension",))


def is_index_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an embeddings index written by :func:`append_index_rows` (CSV or Parquet)."""
    path = Path(path)
    return path.suffix.lower() in (".csv", ".parquet") and table_columns(path) == list(INDEX_COLUMNS)


def read_index_rows(index: str | os.PathLike) -> list[dict]:
    """Rows of an embeddings index (CSV values as strings, Parquet values typed) as dictionaries."""
    return read_table(index)
