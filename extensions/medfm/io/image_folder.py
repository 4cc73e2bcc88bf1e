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


def image_folder_datalist(root: str | os.PathLike, image_glob: str = "**/*") -> list[dict]:
    """``[{"image": path, "label": class name}, ...]`` for the images ``image_glob`` matches in each ``root/<class>/``.

    The default glob finds images at any depth of a class folder; files whose suffix is not an
    image's are left out. A class folder without images is an error (it would leave a class in the
    label space without examples).
    """
    items = []
    for name in image_folder_classes(root):
        folder = Path(root) / name
        files = sorted(p for p in folder.glob(image_glob) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise ScanError(f"{folder}: class folder has no images matching {image_glob!r} ({', '.join(IMAGE_SUFFIXES)})")
        items.extend({"image": str(path), "label": name} for path in files)
    return items
