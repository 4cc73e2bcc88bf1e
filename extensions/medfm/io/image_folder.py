"""Datalists from ImageFolder-style trees of 2D images (one folder per class), as torchvision reads them."""

from __future__ import annotations

import os
from pathlib import Path

from .reading import ScanError

__all__ = ["IMAGE_SUFFIXES", "image_folder_classes", "image_folder_datalist"]

#: 2D image files MONAI's PIL reader opens.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def image_folder_classes(root: str | os.PathLike) -> list[str]:
    """Class names of ``root``: its sub-folders, sorted (so label indices are stable)."""
    root = Path(root)
    if not root.is_dir():
        raise ScanError(f"{root}: not a folder of class sub-folders")
    classes = sorted(child.name for child in root.iterdir() if child.is_dir() and not child.name.startswith("."))
    if not classes:
        raise ScanError(f"{root}: no class sub-folders (expected ROOT/<class>/<image>)")
    return classes


def image_folder_datalist(root: str | os.PathLike) -> list[dict]:
    """``[{"image": path, "label": class index}, ...]`` for every image under ``root/<class>/``.

    Images are found recursively in each class folder; a class folder without images is an
    error (it would silently shift nothing but leave a class without examples).
    """
    items = []
    for label, name in enumerate(image_folder_classes(root)):
        files = sorted(p for p in (Path(root) / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise ScanError(f"{Path(root) / name}: class folder has no images ({', '.join(IMAGE_SUFFIXES)})")
        items.extend({"image": str(path), "label": label} for path in files)
    return items
