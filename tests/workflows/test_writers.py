"""The task writers' pieces that the end-to-end tests in tests/test_task_bundles.py cannot see."""

import json

import numpy as np
import pytest
import torch

from medfm.errors import MedfmError
from medfm.task_bundle import read_fine_tuning_record
from medfm.workflows import PredictionWriter
from medfm.workflows.writers import label_statistics


def test_label_statistics_count_measure_and_box_in_lps():
    label = np.zeros((4, 5, 6), np.uint8)
    label[1:3, 2, 3:6] = 1  # 2 x 1 x 3 voxels
    image = np.arange(label.size, dtype=np.int16).reshape(label.shape)
    affine = np.array([[-0.5, 0, 0, 10], [0, 2, 0, -20], [0, 0, 3, 30], [0, 0, 0, 1]])  # RAS, x flipped
    one, two = label_statistics(label, image, affine, {1: "lesion", 2: "absent"})
    inside = image[label == 1]
    assert (one["voxels"], float(one["volume_ml"])) == (6, pytest.approx(6 * 0.5 * 2 * 3 / 1000))
    assert (float(one["mean"]), float(one["min"]), float(one["max"])) == (pytest.approx(inside.mean()), inside.min(), inside.max())
    assert float(one["std"]) == pytest.approx(inside.std())
    # voxel x 1..2 -> RAS x 9.5..9.0 -> LPS x -9.5..-9.0; voxel y 2 -> RAS y -16 -> LPS 16; z 3..5 -> 39..45
    box = [float(one[f"bbox_{end}_{axis}"]) for end in ("min", "max") for axis in "xyz"]
    assert box == [-9.5, 16.0, 39.0, -9.0, 16.0, 45.0]
    assert two == {"label": 2, "name": "absent", "voxels": 0, "volume_ml": "0"}  # the table leaves the rest empty
    with pytest.raises(ValueError, match="not on one grid"):
        label_statistics(label, image[:-1], affine, {1: "lesion"})


def test_predictions_name_their_classes_and_refuse_what_does_not_fit():
    writer = PredictionWriter(None, classes={"0": "benign", "1": "malignant"})
    assert writer.tables["predictions.csv"][-3:] == ("prediction", "benign", "malignant")
    assert writer.result(None, torch.tensor([[0.25, 0.75]]), "scan") == {"benign": 0.25, "malignant": 0.75}
    with pytest.raises(MedfmError, match="scan: the network gave 3 values for 2 classes"):
        writer.result(None, torch.tensor([[0.2, 0.3, 0.5]]), "scan")
    with pytest.raises(MedfmError, match="non-finite"):
        writer.result(None, torch.tensor([[float("nan"), 1.0]]), "scan")
    with pytest.raises(MedfmError, match="clash with the columns"):
        PredictionWriter(None, classes=["input", "other"])
    assert PredictionWriter(None).result(None, torch.tensor([[61.5]]), "scan") == 61.5


@pytest.mark.parametrize("record, message", [
    ("{not json", "not readable JSON"),
    ('{"task": "denoising", "labels": ["a"], "settings": {}}', "task 'denoising' is not one of"),
    ('{"task": "segmentation", "labels": ["a"], "settings": {}}', "segmentation labels must map label values"),
    ('{"task": "classification", "labels": [], "settings": {}}', "classification labels must be a list of names"),
    ('{"task": "classification", "labels": ["a", "b"]}', "field 'settings' is missing"),
])
def test_a_fine_tuning_record_is_checked_field_by_field(tmp_path, record, message):
    (tmp_path / "models").mkdir()
    torch.save({}, tmp_path / "models" / "model.pt")
    (tmp_path / "fine_tuning.json").write_text(record)
    with pytest.raises(MedfmError, match=message) as raised:
        read_fine_tuning_record(tmp_path)
    assert str(tmp_path / "fine_tuning.json") in str(raised.value)


def test_a_fine_tuning_record_needs_its_checkpoint(tmp_path):
    (tmp_path / "fine_tuning.json").write_text(json.dumps({"task": "regression", "labels": ["age"], "settings": {}}))
    with pytest.raises(MedfmError, match="no models/model.pt"):
        read_fine_tuning_record(tmp_path)
