"""Pictures to check a run at a glance: the three orthogonal middle planes of a scan.

Planes are shown as radiologists read them, whatever the voxel order of the file: axial and
coronal with the patient's right on the left, axial with anterior up, coronal and sagittal with
superior up, sagittal with anterior on the left; pixels are made square in millimetres. A scan
that is upside down, mirrored or squashed therefore looks wrong here, as it would to a reader.

- :func:`write_scan_preview`: one scan (``medfm infer --preview``), its segmentation overlaid or
  its restoration in a row beneath.
- :func:`write_plane_tile` and :func:`write_contact_sheet`: one small strip per scan and pages of
  them (``medfm embed --preview``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from .io.atomic import atomic_path

__all__ = ["PLANES", "contact_sheet_pages", "write_input_preview", "display_window", "middle_planes", "write_contact_sheet",
           "write_plane_tile", "write_scan_preview"]

PLANES = ("axial", "coronal", "sagittal")
#: CT soft-tissue window (HU): level 40, width 400.
CT_WINDOW = (-160.0, 240.0)
#: Label colours (RGB), cycled for label values 1, 2, ...
LABEL_COLOURS = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                          (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)], np.uint8)
OVERLAY_OPACITY = 0.45
#: Scans per contact-sheet page: a page stays readable, and a cohort of thousands gets many pages.
SHEET_ROWS = 20


def middle_planes(volume: np.ndarray, affine: np.ndarray) -> list[tuple[np.ndarray, tuple[float, float]]]:
    """The axial, coronal and sagittal middle planes of a 3D ``volume`` whose voxel-to-world ``affine`` is
    RAS (NIfTI's and MONAI's convention), each as ``(rows, columns)`` in display orientation with its
    pixel size ``(row mm, column mm)``."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"a preview needs a 3D volume, not shape {volume.shape}")
    orientation = nib.orientations.io_orientation(np.asarray(affine, float))
    canonical = nib.orientations.apply_orientation(volume, orientation)  # axes now point to R, A, S
    sizes = np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))
    spacing = np.empty(3)
    spacing[orientation[:, 0].astype(int)] = sizes
    x, y, z = (size // 2 for size in canonical.shape)
    # transposed and turned half round: rows run from anterior or superior down, columns from the patient's right
    return [(np.flip(canonical[:, :, z].T), (spacing[1], spacing[0])),
            (np.flip(canonical[:, y, :].T), (spacing[2], spacing[0])),
            (np.flip(canonical[x, :, :].T), (spacing[2], spacing[1]))]


def display_window(volume: np.ndarray, modality: str = "") -> tuple[float, float]:
    """Intensities shown from black to white: the CT soft-tissue window for CT, else the 0.5th to 99.5th
    percentile (MR and other modalities have no absolute scale)."""
    if modality.upper() == "CT":
        return CT_WINDOW
    return _range(np.percentile, volume, [0.5, 99.5])


def _range(statistic, volume: np.ndarray, *arguments) -> tuple[float, float]:
    """``statistic(finite voxels, *arguments)`` as a (low, high) window that is never empty."""
    finite = np.asarray(volume, float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = (float(value) for value in statistic(finite, *arguments))
    return low, high if high > low else low + 1.0


def _gray(plane: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    low, high = window
    scaled = (np.asarray(plane, float) - low) / max(high - low, 1e-12)
    return np.repeat((np.clip(np.nan_to_num(scaled), 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=-1)


def _overlaid(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    values = np.rint(np.asarray(labels)).astype(int)
    colours = LABEL_COLOURS[(np.maximum(values, 1) - 1) % len(LABEL_COLOURS)]
    blended = (1 - OVERLAY_OPACITY) * rgb + OVERLAY_OPACITY * colours
    return np.where((values > 0)[..., None], blended, rgb).astype(np.uint8)


def _square_pixels(rgb: np.ndarray, pixel_mm: tuple[float, float], height: int):
    """The plane as a PIL image ``height`` pixels high, its pixels square in millimetres."""
    from PIL import Image

    rows, columns = rgb.shape[:2]
    width_mm, height_mm = columns * pixel_mm[1], rows * pixel_mm[0]
    width = max(1, int(round(height * width_mm / max(height_mm, 1e-6))))
    return Image.fromarray(np.ascontiguousarray(rgb)).resize((width, height), Image.Resampling.NEAREST)


def _strip(volume: np.ndarray, affine: np.ndarray, window: tuple[float, float], height: int,
           labels: np.ndarray | None = None):
    """The three middle planes side by side (labels overlaid in colour)."""
    from PIL import Image

    planes = middle_planes(volume, affine)
    label_planes = middle_planes(labels, affine) if labels is not None else [None] * 3
    images = []
    for (plane, pixel_mm), label_plane in zip(planes, label_planes):
        rgb = _gray(plane, window)
        if label_plane is not None:
            rgb = _overlaid(rgb, label_plane[0])
        images.append(_square_pixels(rgb, pixel_mm, height))
    gap = 4
    strip = Image.new("RGB", (sum(i.width for i in images) + gap * (len(images) - 1), height), (0, 0, 0))
    left = 0
    for image in images:
        strip.paste(image, (left, 0))
        left += image.width + gap
    return strip


def _captioned(rows: Sequence[tuple[str, object]], margin: int = 18):
    """Strips stacked under one-line captions, on a dark background."""
    from PIL import Image, ImageDraw

    width = max(strip.width for _, strip in rows) + 8
    height = sum(strip.height + margin for _, strip in rows) + 4
    page = Image.new("RGB", (width, height), (16, 16, 16))
    draw = ImageDraw.Draw(page)
    top = 2
    for caption, strip in rows:
        draw.text((4, top + 2), caption, fill=(235, 235, 235))
        page.paste(strip, (4, top + margin))
        top += strip.height + margin
    return page


def _save_png(image, target: Path) -> Path:
    target = Path(target)
    with atomic_path(target) as temporary:
        image.save(temporary, format="PNG")
    return target


def write_scan_preview(target: str | os.PathLike, volume: np.ndarray, affine: np.ndarray, modality: str = "",
                       segmentations: Sequence[tuple[str, np.ndarray]] = (), images: Sequence[tuple[str, np.ndarray]] = (),
                       title: str = "", height: int = 256) -> Path:
    """One scan's middle planes in its display window, a row per segmentation (overlaid on the scan) and
    per image on the scan's grid (e.g. a restoration, shown in the scan's window). Returns ``target``."""
    window = display_window(volume, modality)
    caption = " | ".join(PLANES) + f"  window {window[0]:g} to {window[1]:g}"
    rows = [(f"{title}: {caption}" if title else caption, _strip(volume, affine, window, height))]
    rows += [(name, _strip(volume, affine, window, height, labels)) for name, labels in segmentations]
    rows += [(name, _strip(image, affine, window, height)) for name, image in images]
    return _save_png(_captioned(rows), target)


def write_plane_tile(target: str | os.PathLike, volume: np.ndarray, affine: np.ndarray, height: int = 96) -> Path:
    """A small strip of the three middle planes, intensities from the volume's minimum to its maximum (so a
    volume scaled wrongly, e.g. saturated, shows it), for a contact sheet."""
    return _save_png(_strip(volume, affine, _range(lambda v: (v.min(), v.max()), volume), height), target)


def contact_sheet_pages(count: int, rows: int = SHEET_ROWS) -> int:
    return max(1, -(-count // rows))


def write_contact_sheet(target: str | os.PathLike, tiles: Sequence[tuple[str, str | os.PathLike]],
                        rows: int = SHEET_ROWS) -> list[Path]:
    """Pages of captioned tiles (``target``, then ``<stem>_2.png``... when there are more than ``rows``);
    further pages left by an earlier, longer sheet are removed."""
    from PIL import Image

    target = Path(target)
    count = contact_sheet_pages(len(tiles), rows)
    for stale in target.parent.glob(f"{target.stem}_*{target.suffix}"):
        number = stale.stem[len(target.stem) + 1:]
        if number.isdigit() and int(number) > count:
            stale.unlink()
    pages = []
    for page in range(count):
        chunk = tiles[page * rows:(page + 1) * rows]
        opened = [(caption, Image.open(path).convert("RGB")) for caption, path in chunk]
        name = target if page == 0 else target.with_name(f"{target.stem}_{page + 1}{target.suffix}")
        pages.append(_save_png(_captioned(opened), name))
    return pages


def write_input_preview(bundle_dir: Path, source: str, folder: Path, series_uid: str | None) -> Path:
    """``<input>_preview.png`` in ``folder``: the input's middle planes (read again, as the bundle read it) with the
    NIfTI outputs in ``folder`` that lie on its grid (a segmentation overlaid, other images in rows beneath)."""
    from .bundles import Bundle
    from .io.embeddings import input_stem, output_stem
    from .io.reading import LoadScan
    from .io.segmentation import corner_offset_mm

    scan = LoadScan(series_uid, allow_2d=True)(source)
    volume, affine = scan.numpy(), scan.affine.numpy()
    segmentations, images = [], []
    for path in sorted(folder.glob("*.nii.gz")):
        output = nib.load(path)
        if output.shape == volume.shape and corner_offset_mm(output.affine, affine, volume.shape) < 1e-3:
            (segmentations if path.name.endswith("_seg.nii.gz") else images).append((path.name, np.asarray(output.dataobj)))
    expected = Bundle.find(bundle_dir).contract.get("modality")  # a CT model's input gets the CT window
    modality = scan.meta.get("Modality") or (expected if expected == "CT" else "")
    return write_scan_preview(folder / f"{output_stem(source)}_preview.png", volume, affine, modality, segmentations,
                              images, title=input_stem(source))
