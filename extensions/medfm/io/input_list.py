"""Input lists: scans named directly (files, folders, DICOMweb URLs) and scans listed in ``.csv`` files."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import MedfmError
from .dicomweb import DicomWebLocation, adopt_url_credentials, image_series, is_dicomweb_url

__all__ = ["expand_inputs", "listed_input"]


def listed_input(value: str, list_file: Path) -> str | Path:
    """An input named in a list file: a DICOMweb URL as it is, a relative path relative to the list's folder."""
    if is_dicomweb_url(value):
        return adopt_url_credentials(value)
    listed = Path(value).expanduser()
    return listed if listed.is_absolute() else (list_file.parent / listed).resolve()


def _scans_at(url: str) -> list[str]:
    """A series URL, or the URL of each image series of a study URL (asked of the server)."""
    if DicomWebLocation.parse(url).series_uid:
        return [url]
    return [series.location.url for series in image_series(url)]


def expand_inputs(items: Iterable[str | os.PathLike]) -> list[str | Path]:
    """Scans named directly, and those listed in ``.csv`` files (column ``image``, else the first).

    Relative paths in a list are relative to the list's folder. A DICOMweb study URL stands for each
    of its image series (one series URL each); a series URL stays as it is. A list that cannot be
    read, is not UTF-8, is empty, or has a row without the image column is a :class:`MedfmError`
    naming it.
    """
    sources: list[str | Path] = []
    for item in items:
        if is_dicomweb_url(item):
            sources.extend(_scans_at(adopt_url_credentials(str(item))))
            continue
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
            listed = listed_input(row[column].strip(), path)
            sources.extend(_scans_at(listed) if isinstance(listed, str) else [listed])
    return sources
