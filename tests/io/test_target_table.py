"""Fine-tuning datalists from a CSV table of images and targets."""

import pytest

from medfm.errors import MedfmError
from medfm.io import target_table_datalist, target_table_labels


@pytest.fixture
def table(tmp_path):
    for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    path = tmp_path / "dataset.csv"
    path.write_text(f"image,label,age\na.nii.gz,CN,71.5\nb.nii.gz,AD,80\n{tmp_path / 'c.nii.gz'},CN,64\n")
    return path


def test_classification_targets_index_the_sorted_class_names(table):
    assert target_table_labels(table, "classification") == ["AD", "CN"]
    items = target_table_datalist(table, "classification")
    assert [item["label"] for item in items] == [1, 0, 1]
    assert items[0]["image"] == str(table.parent / "a.nii.gz")  # relative to the table's folder


def test_extra_columns_are_carried_where_a_row_has_a_value(tmp_path):
    for name in ("a.nii.gz", "b.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    path = tmp_path / "dataset.csv"
    path.write_text("image,label,modality\na.nii.gz,x,CT\nb.nii.gz,y,\n")
    items = target_table_datalist(path, "classification", extra_columns=["modality", "absent"])
    assert [(item["label"], item["modality"]) for item in items] == [(0, "CT"), (1, "")]  # same keys: they batch
    assert all("absent" not in item for item in items)
    with pytest.raises(ValueError, match="cannot be"):
        target_table_datalist(path, "classification", extra_columns=["label"])


def test_regression_targets_are_one_float_per_item(table):
    assert target_table_labels(table, "regression", target_column="age") == ["age"]
    items = target_table_datalist(table, "regression", target_column="age")
    assert [item["label"].tolist() for item in items] == [[71.5], [80.0], [64.0]]


@pytest.mark.parametrize("content,message", [
    ("image,diagnosis\na.nii.gz,CN\n", "no column 'label'"),
    ("image,label\n", "no rows"),
    ("image,label\nmissing.nii.gz,CN\n", "line 2: image missing.nii.gz not found"),
    ("image,label\na.nii.gz,\n", "line 2 has an empty label"),
])
def test_bad_tables_name_the_file_and_the_problem(tmp_path, content, message):
    (tmp_path / "a.nii.gz").write_bytes(b"")
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(MedfmError, match=message) as error:
        target_table_datalist(path, "classification")
    assert str(path) in str(error.value)


def test_non_numeric_regression_targets_and_unknown_tasks_are_refused(table):
    with pytest.raises(MedfmError, match="line 2: regression target 'CN' is not a number"):
        target_table_datalist(table, "regression")
    with pytest.raises(MedfmError, match="task must be one of"):
        target_table_datalist(table, "segmentation")
