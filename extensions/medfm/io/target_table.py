"""Datalists for fine-tuning from a CSV table of image paths and targets."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import MedfmError

__all__ = ["target_table_datalist", "target_table_labels"]

TASKS = ("classification", "regression")


def _rows(table: Path, image_column: str, target_column: str, extra_columns: Sequence[str] = ()
          ) -> list[tuple[str, str, dict[str, str]]]:
    """``(image, target, {extra column: value})`` per row, for the extra columns the table has (empty cells as "",
    so every item of one table has the same keys and they batch together)."""
    try:
        with open(table, newline="") as stream:
            reader = csv.DictReader(stream)
            missing = [c for c in (image_column, target_column) if c not in (reader.fieldnames or [])]
            if missing:
                raise MedfmError(f"{table}: no column {missing[0]!r} (columns: {', '.join(reader.fieldnames or [])})")
            rows = [(row[image_column].strip(), row[target_column].strip(),
                     {c: (row[c] or "").strip() for c in extra_columns if c in reader.fieldnames}) for row in reader]
    except OSError as error:
        raise MedfmError(f"{table}: cannot be read ({error.strerror})") from None
    if not rows:
        raise MedfmError(f"{table}: no rows")
    for line, (image, target, _) in enumerate(rows, start=2):
        if not image or not target:
            raise MedfmError(f"{table}: line {line} has an empty {image_column if not image else target_column}")
    return rows


def target_table_labels(table: str | os.PathLike, task: str, image_column: str = "image",
                        target_column: str = "label") -> list[str]:
    """Class names (sorted unique targets) for classification; ``[target_column]`` for regression."""
    if task not in TASKS:
        raise MedfmError(f"task must be one of {TASKS}, got {task!r}")
    if task == "regression":
        return [target_column]
    return sorted({target for _, target, _ in _rows(Path(table), image_column, target_column)})


def target_table_datalist(table: str | os.PathLike, task: str, image_column: str = "image",
                          target_column: str = "label", extra_columns: Sequence[str] = (),
                          classes: Sequence[str] | None = None) -> list[dict]:
    """``[{"image": path, "label": target}]`` from a CSV with an image column and a target column,
    plus the row's value of each of ``extra_columns`` (e.g. ``modality``) that the table has ("" where a cell is empty).

    Relative image paths are taken from the CSV's folder. Classification targets become indices
    into :func:`target_table_labels`; regression targets become float32 arrays of shape ``(1,)``. A
    non-numeric regression target or a missing image file is an error naming the line. ``classes``: the class
    names of a model being trained further (a task bundle's), whose order the indices follow; a target that
    is not one of them is an error naming the line.
    """
    table = Path(table)
    clashing = sorted({"image", "label"} & set(extra_columns))
    if clashing:
        raise ValueError(f"extra_columns cannot be {clashing}: those keys hold the image and the target")
    labels = list(classes) if classes and task == "classification" else target_table_labels(table, task, image_column, target_column)
    items = []
    for line, (image, target, extra) in enumerate(_rows(table, image_column, target_column, extra_columns), start=2):
        path = Path(image) if Path(image).is_absolute() else table.parent / image
        if not path.exists():
            raise MedfmError(f"{table}: line {line}: image {image} not found")
        if task == "classification":
            if target not in labels:
                raise MedfmError(f"{table}: line {line}: class {target!r} is not one of the model's classes {labels}")
            label = labels.index(target)
        else:
            try:
                label = np.array([float(target)], dtype=np.float32)  # one output per item; collates to (B, 1)
            except ValueError:
                raise MedfmError(f"{table}: line {line}: regression target {target!r} is not a number") from None
            if not np.isfinite(label).all():
                raise MedfmError(f"{table}: line {line}: regression target {target!r} is not finite")
        items.append({"image": str(path), "label": label, **extra})
    return items
