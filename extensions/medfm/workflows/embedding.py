"""Embeddings of a cohort: the writer behind every bundle's ``configs/embed.json``, and the runner set up with it.

One ``.npy`` per input (and region), indexed in ``embeddings.csv`` (or ``.parquet``), by
:class:`~medfm.workflows.cohort.CohortRunner`: resumable, distributed, one failing input never
stopping the rest.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.inferers import Inferer

from ..errors import MedfmError
from ..io.embeddings import INDEX_COLUMNS, embedding_file_name, index_row, save_vector
from .cohort import CohortRunner, CohortWriter

__all__ = ["EmbeddingRunner", "EmbeddingWriter"]


class EmbeddingWriter(CohortWriter):
    """One float32 ``.npy`` vector per input (and region), named after it, and its row in the index.

    Args:
        index_file: the index's file name (``.csv``, or ``.parquet`` with the parquet extra).
        output_key: for inferers returning a dict, the key holding the embedding.
        pooling: applied to the one item's output (e.g. global average pooling of a feature map).
    """

    file_columns = ("embedding",)
    integer_columns = ("dimension",)
    action = "embedded"

    def __init__(self, index_file: str = "embeddings.csv", output_key: str | None = None,
                 pooling: Callable | None = None) -> None:
        if Path(index_file).suffix.lower() not in (".csv", ".parquet") or Path(index_file).name != str(index_file):
            raise MedfmError(f"{index_file}: the index must be a file name (no folders) ending in .csv or .parquet")
        self.tables = {str(index_file): INDEX_COLUMNS}
        self.output_key = output_key
        self.pooling = pooling

    def result(self, image, output, name: str) -> np.ndarray:
        """The embedding vector (float32); non-finite values are an error."""
        if self.output_key is not None:
            output = output[self.output_key]
        output = output[0].float()
        if self.pooling is not None:
            output = self.pooling(output)
        vector = torch.as_tensor(output).detach().cpu().numpy().astype(np.float32).reshape(-1)
        if not np.isfinite(vector).all():
            raise MedfmError(f"{name}: the embedding holds {int((~np.isfinite(vector)).sum())} non-finite "
                             f"values of {vector.size} (NaN or Inf); not written")
        return vector

    def __call__(self, item: dict, image, output, source, output_dir: Path, row: dict) -> dict[str, list[dict]]:
        vector = self.result(image, output, item["image"] + (f" ({item['region']})" if item["region"] else ""))
        name = embedding_file_name(item["image"], item["region"])
        save_vector(output_dir / name, vector)
        return {self.index: [index_row(row["input"], row["series_uid"], row["model"], row["weights"], name, int(vector.size),
                                       region=row["region"], center_lps=row["center_lps"])]}


class EmbeddingRunner(CohortRunner):
    """:class:`~medfm.workflows.cohort.CohortRunner` with an :class:`EmbeddingWriter`: embed many inputs with one
    network (``output_key``, ``pooling`` and ``index_file`` as for the writer; the rest as for the runner)."""

    def __init__(self, inputs: Sequence, preprocessing: Callable, network: torch.nn.Module, inferer: Inferer,
                 output_dir: str | os.PathLike, output_key: str | None = None, pooling: Callable | None = None,
                 index_file: str = "embeddings.csv", **runner_arguments) -> None:
        super().__init__(inputs, preprocessing, network, inferer, EmbeddingWriter(index_file, output_key, pooling),
                         output_dir, **runner_arguments)
