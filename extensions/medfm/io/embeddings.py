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

__all__ = ["SaveEmbeddingd", "input_stem"]

_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm", ".zip")


def input_stem(path: str | os.PathLike) -> str:
    """Base name of an input file or DICOM folder without its image suffix (``ct.nii.gz`` -> ``ct``)."""
    name = Path(str(path).rstrip("/\\")).name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


class SaveEmbeddingd(MapTransform):
    """Save each key's vector as ``<output_dir>/<input stem>_<postfix>.npy`` (float32).

    The input path comes from the ``filename_or_obj`` meta entry of ``source_key`` (the loaded
    image), so the file is named like the input whatever produced the vector. Files are written
    to a temporary name and renamed, so a failed run leaves no truncated ``.npy``.
    """

    def __init__(self, keys: KeysCollection, output_dir: str | os.PathLike, source_key: str = "image",
                 postfix: str = "embedding", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.source_key = source_key
        self.postfix = postfix

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        source = d.get(self.source_key)
        if not isinstance(source, MetaTensor) or "filename_or_obj" not in source.meta:
            raise ValueError(f"SaveEmbeddingd: '{self.source_key}' carries no filename_or_obj to name the output after")
        stem = input_stem(source.meta["filename_or_obj"])
        for key in self.key_iterator(d):
            vector = convert_data_type(d[key], np.ndarray, dtype=np.float32)[0]
            with atomic_path(self.output_dir / f"{stem}_{self.postfix}.npy") as temporary:
                with open(temporary, "wb") as stream:  # a path would get ".npy" appended
                    np.save(stream, vector, allow_pickle=False)
        return d
