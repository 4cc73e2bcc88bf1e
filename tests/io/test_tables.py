import pytest

from medfm.io.tables import read_table, write_table


@pytest.mark.parametrize("name", ["table.csv", "table.parquet"])
def test_a_missing_cell_reads_back_empty_in_either_format(tmp_path, name):
    path = tmp_path / name
    write_table(path, ["input", "series_uid", "dimension"], [{"input": "a.nii.gz", "series_uid": None, "dimension": 3},
                                                             {"input": "b.nii.gz", "dimension": 4}], integer_columns=["dimension"])
    rows = read_table(path)
    assert [row["series_uid"] for row in rows] == ["", ""]
    assert [str(row["dimension"]) for row in rows] == ["3", "4"]
