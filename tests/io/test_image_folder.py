import pytest
from PIL import Image

from medfm.io import ScanError, image_folder_classes, image_folder_datalist


def test_classes_are_sorted_folders_and_images_are_found_recursively(tmp_path):
    for name, files in (("zebra", ["a.png", "nested/b.JPG"]), ("ant", ["c.jpeg"])):
        for file in files:
            (tmp_path / name / file).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4)).save(tmp_path / name / file, format="PNG" if file.endswith("png") else "JPEG")
    (tmp_path / "zebra" / "notes.txt").write_text("not an image")
    assert image_folder_classes(tmp_path) == ["ant", "zebra"]
    items = image_folder_datalist(tmp_path)
    assert [(item["label"], item["image"].rsplit("/", 1)[-1]) for item in items] == [("ant", "c.jpeg"), ("zebra", "a.png"), ("zebra", "b.JPG")]
    assert [item["image"].rsplit("/", 1)[-1] for item in image_folder_datalist(tmp_path, "*")] == ["c.jpeg", "a.png"]


def test_empty_trees_and_classes_are_errors(tmp_path):
    with pytest.raises(ScanError, match="no class sub-folders"):
        image_folder_classes(tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(ScanError, match=r"cat: class folder has no images"):
        image_folder_datalist(tmp_path)
    with pytest.raises(ScanError, match="not a folder"):
        image_folder_classes(tmp_path / "absent")
