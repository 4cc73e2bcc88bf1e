"""Input lists: scans named directly and scans listed in ``.csv`` files."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import MedfmError

__all__ = ["expand_inputs"]


def expand_inputs(items: Iterable[str | os.PathLike]) -> list[Path]:
    """Scans named directly, and those listed in ``.csv`` files (column ``image``, else the first).

    Relative paths in a list are relative to the list's folder. A list that cannot be read, is not
    UTF-8, is empty, or has a row without the image column is a :class:`MedfmError` naming it.
    """
    sources: list[Path] = []
    for item in items:
        path = Path(str(item)).expanduser()
        if path.suffix.lower() != ".csv":
            sources.append(path)
            continue
        try:
            with open(path, newline="", encoding="utf-8-sig") as stream:
                rows = list(csv.reader(stream))
        except OSError as error:
            raise MedfmError(f"{path}: cannot be read ({error.strerror})") from None
        except UnicodeDecodeError:
            raise MedfmError(f"{path}: not a UTF-8 text file; save the input list as UTF-8 CSV") from None
        if not rows:
            raise MedfmError(f"{path}: empty input list")
        has_header = "image" in rows[0]
        column = rows[0].index("image") if has_header else 0
        for number, row in enumerate(rows[1:] if has_header else rows, start=2 if has_header else 1):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= column or not row[column].strip():
                raise MedfmError(f"{path}: line {number} has no value in the image column")
            listed = Path(row[column].strip()).expanduser()
            sources.append(listed if listed.is_absolute() else (path.parent / listed).resolve())
    return sources
