"""Writing a benchmark's result rows (imported by the scripts beside it)."""

from __future__ import annotations

import csv
from pathlib import Path


def write_rows(rows: list[dict], path: Path) -> None:
    """``rows`` (dicts with the same keys) as a CSV with a header, columns in the first row's order."""
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
