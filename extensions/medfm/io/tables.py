"""Result tables (an index of outputs, predictions, statistics): one row per input or per input and label,
with a header row naming their columns; CSV, or Parquet by the file's name."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from monai.data import CSVSaver

from ..errors import MedfmError
from .atomic import atomic_path

__all__ = ["HeaderedCSVSaver", "durable_append", "drop_partial_line", "merge_rows_by_input", "read_table", "table_columns",
           "write_table"]


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


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() == ".parquet"


def _parquet():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise MedfmError("a .parquet table needs pyarrow: pip install 'medfm[parquet]', or name the table .csv") from None
    return pyarrow


def read_table(path: str | os.PathLike) -> list[dict]:
    """Rows of a result table as dictionaries (CSV values as strings, Parquet values typed); none when absent."""
    path = Path(path)
    if not path.is_file():
        return []
    if _is_parquet(path):
        return _parquet().parquet.read_table(path).to_pylist()
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def table_columns(path: str | os.PathLike) -> list[str] | None:
    """The header of a result table (CSV or Parquet), or None when it is not a readable table."""
    path = Path(path)
    try:
        if _is_parquet(path):
            return list(_parquet().parquet.read_schema(path).names)
        with open(path, newline="", encoding="utf-8") as stream:
            return next(csv.reader(stream), [])
    except (OSError, UnicodeDecodeError, ValueError, csv.Error):
        return None
    except Exception as error:  # pyarrow's own errors for a file that is not Parquet
        if type(error).__module__.startswith("pyarrow"):
            return None
        raise


def write_table(path: str | os.PathLike, columns: Sequence[str], rows: Sequence[Mapping], integer_columns: Sequence[str] = ()) -> None:
    """Write a whole table atomically (CSV, or Parquet when the name ends in ``.parquet``); missing cells are empty."""
    path = Path(path)
    rows = [{column: row.get(column, "") for column in columns} for row in rows]
    for row in rows:
        for column in integer_columns:
            row[column] = int(row[column])
    with atomic_path(path) as temporary:
        if _is_parquet(path):
            pyarrow = _parquet()
            schema = pyarrow.schema([(column, pyarrow.int64() if column in integer_columns else pyarrow.string())
                                     for column in columns])
            cells = [{k: v if k in integer_columns else "" if v is None else str(v) for k, v in row.items()} for row in rows]
            pyarrow.parquet.write_table(pyarrow.Table.from_pylist(cells, schema=schema), temporary)
            return
        with open(temporary, "w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(columns), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)


def durable_append(path: str | os.PathLike, columns: Sequence[str], row: Mapping) -> None:
    """Append one CSV row and sync it, so a row on disk is a whole row (header first when new)."""
    path = Path(path)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    if not path.exists() or path.stat().st_size == 0:
        writer.writeheader()
    writer.writerow({column: row.get(column, "") for column in columns})
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, buffer.getvalue().encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def drop_partial_line(path: str | os.PathLike) -> None:
    """Cut a last line without its newline (a process killed while appending it)."""
    path = Path(path)
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as stream:
            stream.truncate(data.rfind(b"\n") + 1)


def merge_rows_by_input(staged: Path, target: Path) -> bool:
    """Merge a per-input table (``input,...`` header, e.g. ``predictions.csv``) into the one already in
    ``--out``: the other inputs' rows stay, this input's row is replaced. False when the two are not
    such tables with the same columns (the new file then replaces the old)."""
    if staged.suffix.lower() != ".csv":
        return False
    try:
        with open(staged, newline="", encoding="utf-8") as stream:
            new_header, *new_rows = list(csv.reader(stream))
        with open(target, newline="", encoding="utf-8") as stream:
            old_header, *old_rows = list(csv.reader(stream))
    except (ValueError, UnicodeDecodeError, OSError):
        return False
    if new_header != old_header or not new_header or new_header[0] != "input":
        return False
    replaced = {row[0] for row in new_rows if row}
    with atomic_path(target) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as stream:
            csv.writer(stream, lineterminator="\n").writerows([new_header, *(r for r in old_rows if r and r[0] not in replaced), *new_rows])
    return True
