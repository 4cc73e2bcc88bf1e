"""Writing per-volume embeddings as ``.npy`` files named after their input."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils.type_conversion import convert_data_type

from .atomic import atomic_path

__all__ = ["SaveEmbedding", "SaveEmbeddingd", "input_stem"]

_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm", ".zip")


def input_stem(path: str | os.PathLike) -> str:
    """Base name of an input file or DICOM folder without its image suffix (``ct.nii.gz`` -> ``ct``)."""
    name = Path(str(path).rstrip("/\\")).name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


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
    """Dictionary version of :class:`SaveEmbedding`: the input path is the ``filename_or_obj`` meta
    entry of ``source_key`` (the loaded image), whatever produced the vector.
    """

    def __init__(self, keys: KeysCollection, output_dir: str | os.PathLike, source_key: str = "image",
                 postfix: str = "embedding", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.source_key = source_key
        self.saver = SaveEmbedding(output_dir, postfix)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        source = d.get(self.source_key)
        if not isinstance(source, MetaTensor) or "filename_or_obj" not in source.meta:
            raise ValueError(f"SaveEmbeddingd: '{self.source_key}' carries no filename_or_obj to name the output after")
        for key in self.key_iterator(d):
            self.saver(d[key], source.meta["filename_or_obj"])
        return d
