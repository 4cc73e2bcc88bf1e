import json

import pytest

from medfm.errors import MedfmError
from medfm.io import pretraining_datalist, read_datalist


@pytest.fixture
def scans(tmp_path):
    for name in ("ct_a.nii.gz", "ct_b.nii.gz", "mr_a.nii.gz", "nested/ct_c.nii.gz", ".hidden/ct_d.nii.gz"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    return tmp_path


def test_a_glob_lists_sorted_matches_with_their_source(scans):
    items = pretraining_datalist(scans, "ct_*.nii.gz")
    assert [item["image"] for item in items] == [str(scans / "ct_a.nii.gz"), str(scans / "ct_b.nii.gz")]
    assert all(item["source"] == item["image"] for item in items)
    recursive = pretraining_datalist(scans, "**/ct_*.nii.gz")
    assert [item["image"][len(str(scans)) + 1:] for item in recursive] == ["ct_a.nii.gz", "ct_b.nii.gz", "nested/ct_c.nii.gz"]


def test_a_mapping_of_globs_names_each_match_s_group(scans):
    items = pretraining_datalist(scans, {"CT": "ct_*", "MR": "mr_*"}, group_key="modality", required=["image", "modality"])
    assert [(item["modality"], item["image"].rsplit("/", 1)[-1]) for item in items] == [
        ("CT", "ct_a.nii.gz"), ("CT", "ct_b.nii.gz"), ("MR", "mr_a.nii.gz")]


def test_folder_errors_name_the_folder_and_the_pattern(scans):
    with pytest.raises(MedfmError, match=r"no files match --image_glob '\*.dcm'"):
        pretraining_datalist(scans, "*.dcm")
    with pytest.raises(MedfmError, match="absent: not a folder"):
        pretraining_datalist(scans / "absent", "*")
    with pytest.raises(MedfmError, match="this run needs modality per image"):
        pretraining_datalist(scans, "ct_*", required=["image", "modality"])


def test_a_datalist_wins_over_the_folder_and_keeps_its_fields(scans):
    listing = scans / "lists" / "datalist.json"
    listing.parent.mkdir()
    listing.write_text(json.dumps({"training": [{"image": "../ct_a.nii.gz", "subject": "s1"}, str(scans / "mr_a.nii.gz")]}))
    items = pretraining_datalist(scans / "absent", None, listing)
    assert items[0]["subject"] == "s1" and items[0]["image"] == str(listing.parent / "../ct_a.nii.gz")
    assert items[1] == {"image": str(scans / "mr_a.nii.gz"), "source": str(scans / "mr_a.nii.gz")}
    table = scans / "datalist.csv"
    table.write_text("image,modality\nct_a.nii.gz,CT\nmr_a.nii.gz,MR\n")
    assert [item["modality"] for item in read_datalist(table, ["image", "modality"])] == ["CT", "MR"]


@pytest.mark.parametrize("content, message", [
    ("[]", "lists no images"),
    ("{\"images\": []}", "an object with a 'training' list"),
    ("[{\"image\": \"gone.nii.gz\"}]", r"item 1 lists .*gone.nii.gz, which does not exist"),
    ("[{\"subject\": 1}]", "item 1 has no image"),
    ("[3]", "item 1 is neither a path nor an object"),
    ("[{", "not valid JSON"),
])
def test_bad_json_datalists_are_one_line_errors_naming_the_file(tmp_path, content, message):
    listing = tmp_path / "datalist.json"
    listing.write_text(content)
    with pytest.raises(MedfmError, match=f"datalist.json: .*{message}"):
        read_datalist(listing)


def test_a_csv_row_without_a_required_field_names_its_line(scans):
    table = scans / "datalist.csv"
    table.write_text("image,modality\nct_a.nii.gz,CT\nmr_a.nii.gz,\n")
    with pytest.raises(MedfmError, match="datalist.csv: line 3 has no modality"):
        read_datalist(table, ["image", "modality"])
    table.write_bytes(b"image\n\xff\xfe\n")
    with pytest.raises(MedfmError, match="not a UTF-8 text file"):
        read_datalist(table)
