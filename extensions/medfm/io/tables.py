"""Per-input result tables (predictions, scores) with a header row naming their columns."""

from __future__ import annotations

import os
from collections.abc import Sequence

from monai.data import CSVSaver

__all__ = ["HeaderedCSVSaver"]


class HeaderedCSVSaver(CSVSaver):
    """MONAI's ``CSVSaver`` (one row per input: its path, then its values) with a header row
    ``input,<columns>`` written when the file is started, so the table reads as a table.

    Pass it as ``saver`` to MONAI's ``ClassificationSaver``.

    Args:
        columns: the names of the values in each row, e.g. the class names of the probabilities.
        output_dir, filename, overwrite, delimiter: as for ``CSVSaver``.
    """

    def __init__(self, columns: Sequence[str], output_dir: str | os.PathLike = "./", filename: str = "predictions.csv",
                 overwrite: bool = True, delimiter: str = ",") -> None:
        super().__init__(output_dir=output_dir, filename=filename, overwrite=overwrite, delimiter=delimiter)
        self.columns = [str(column) for column in columns]

    def finalize(self) -> None:
        if self._cache_dict and (not self._filepath.exists() or self._filepath.stat().st_size == 0):
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self._filepath, "w") as stream:
                stream.write(self.delimiter.join(["input", *self.columns]) + "\n")
        super().finalize()
