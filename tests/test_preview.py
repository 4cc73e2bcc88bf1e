"""``--preview`` pictures: three orthogonal middle planes in reading orientation, overlays and contact sheets."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import medfm
from medfm.preview import LABEL_COLOURS, display_window, middle_planes, write_contact_sheet, write_scan_preview
from tests.conftest import cli_in_process


def _marked_volume() -> np.ndarray:
    """RAS voxel order: a bright block at the patient's right, anterior and superior corner."""
    volume = np.zeros((20, 16, 12), np.float32)
    volume[:, :, :] = 10
    volume[10:, 8:, 6:] = 100  # reaches the middle planes (10, 8, 6)
    return volume


def test_planes_read_the_same_whatever_the_voxel_order_and_put_the_patients_right_on_the_left():
    volume, affine = _marked_volume(), np.diag([1.0, 1.0, 1.0, 1.0])
    planes = middle_planes(volume, affine)
    # the same scan stored as LPS with its axes swapped: x reversed, y reversed, then (z, y, x) order
    stored = np.transpose(volume[::-1, ::-1, :], (2, 1, 0))
    stored_affine = np.zeros((4, 4))
    stored_affine[0, 2], stored_affine[1, 1], stored_affine[2, 0], stored_affine[3, 3] = -1, -1, 1, 1
    stored_affine[:3, 3] = [19, 15, 0]
    for (plane, _), (again, _) in zip(planes, middle_planes(stored, stored_affine)):
        np.testing.assert_array_equal(plane, again)
    (axial, _), (coronal, _), (sagittal, _) = planes
    assert axial.shape == (16, 20) and axial[:5, :5].min() == 100 and axial[-5:, -5:].max() == 10, \
        "axial: anterior up, the patient's right on the left"
    assert coronal.shape == (12, 20) and coronal[:4, :5].min() == 100, "coronal: superior up, right on the left"
    assert sagittal.shape == (12, 16) and sagittal[:4, :5].min() == 100, "sagittal: superior up, anterior on the left"


def test_pixels_are_square_in_millimetres_and_ct_gets_its_window(tmp_path):
    volume = np.random.default_rng(0).normal(0, 50, (40, 40, 10)).astype(np.float32)
    affine = np.diag([1.0, 1.0, 4.0, 1.0])  # 4 mm slices: coronal and sagittal planes are as tall as they are wide
    target = write_scan_preview(tmp_path / "p.png", volume, affine, "CT", height=100)
    picture = np.asarray(Image.open(target).convert("RGB"))
    assert display_window(volume, "CT") == (-160.0, 240.0)
    low, high = display_window(volume * 0 + np.arange(40)[:, None, None], "MR")
    assert 0 <= low < 1 and 38 < high <= 39
    # three 100-pixel planes, each 100 wide (40 mm by 40 mm), with 4-pixel gaps and the page margin
    assert picture.shape[1] == 3 * 100 + 2 * 4 + 8


def test_a_segmentation_is_overlaid_in_colour_and_a_restoration_shown_beneath(tmp_path):
    volume = _marked_volume()
    labels = (volume > 50).astype(np.uint8)
    target = write_scan_preview(tmp_path / "p.png", volume, np.eye(4), "MR", segmentations=[("seg", labels)],
                                images=[("restored", volume * 2)], height=64)
    picture = np.asarray(Image.open(target).convert("RGB")).astype(int)
    red, green = LABEL_COLOURS[0][:2].astype(int)
    assert red - green > 100
    tinted = picture[..., 0] - picture[..., 1] > 40  # gray has red equal to green; label 1 is tinted red
    assert tinted.sum() > 20, "label voxels are coloured"
    assert picture.shape[0] > 3 * 64, "three rows: the scan, the overlay, the restoration"


def test_contact_sheets_come_in_pages(tmp_path):
    tiles = []
    for index in range(5):
        tile = tmp_path / f"t{index}.png"
        Image.fromarray(np.full((20, 60, 3), 40 * index, np.uint8)).save(tile)
        tiles.append((f"scan {index}", tile))
    pages = write_contact_sheet(tmp_path / "sheet.png", tiles, rows=2)
    assert [p.name for p in pages] == ["sheet.png", "sheet_2.png", "sheet_3.png"]
    assert Image.open(pages[0]).size[1] > Image.open(pages[2]).size[1]
    assert write_contact_sheet(tmp_path / "sheet.png", tiles[:1], rows=2) == [tmp_path / "sheet.png"]
    assert sorted(p.name for p in tmp_path.glob("sheet*.png")) == ["sheet.png"], "a shorter sheet leaves no stale pages"


@pytest.mark.slow
def test_infer_and_embed_previews_show_every_input(small_ct, tmp_path, capfd):
    result = cli_in_process(["infer", "models_genesis_chest_ct", str(small_ct), "--out", str(tmp_path / "out"),
                             "--preview", "--report", str(tmp_path / "run.json")], capfd)
    assert result.returncode == 0, result.stderr
    [picture] = (tmp_path / "out").glob("*_preview.png")
    assert str(picture) in result.stdout
    pixels = np.asarray(Image.open(picture).convert("L"))
    assert pixels.shape[0] > 2 * 256, "the scan and its restoration"
    top = pixels[20:270]
    assert top.std() > 10, "the scan's planes are not blank"

    scans = [str(small_ct), medfm.samples.path("mr_head_t1")]
    embedded = cli_in_process(["embed", "models_genesis_chest_ct", *scans, "--out", str(tmp_path / "emb"), "--preview",
                               "--progress", "False"], capfd)
    assert embedded.returncode == 0, embedded.stderr
    assert len(list((tmp_path / "emb" / "preview").glob("*.png"))) == 2
    sheet = np.asarray(Image.open(tmp_path / "emb" / "preview.png").convert("L"))
    assert sheet.shape[0] > 2 * 96
    for band in (sheet[20:110], sheet[130:220]):  # each scan's tile under its caption
        assert band.std() > 5
