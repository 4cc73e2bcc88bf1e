"""From a foundation bundle to a task bundle run over a cohort: ``medfm finetune`` (training, or ``--from`` a run of
``python -m monai.bundle run``) and ``medfm infer TASK`` over many inputs, resumed after SIGKILL and on two processes.

The data are crops of the real head CT and MRI (medfm.samples); the segmentation labels are HU thresholds.
"""

import csv
import json
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import load_decathlon_datalist

import medfm
from medfm.bundles import metadata_schema
from medfm.errors import MedfmError
from medfm.weights import load_checkpoint, sha256_of
from medfm.workflows import datalist_fingerprint
from tests.conftest import (BUNDLES, GENESIS, TORCHRUN, bundle_run, dciodvfy_errors, run_command,
                            write_modality_classification_table)

pytestmark = pytest.mark.slow

MEDFM = [sys.executable, "-m", "medfm"]
SMALL_GENESIS_RUN = ["--patch_size", "[32,32,16]", "--patches_per_volume", "2", "--max_epochs", "2", "--val_interval", "1",
                     "--num_workers", "0", "--val_fraction", "0.5"]


def _rows(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def _tables(folder):
    return {name: (folder / name).read_text() for name in ("segmentations.csv", "statistics.csv", "failed.csv")}


@pytest.fixture(scope="module")
def segmentation_task(tiny_segmentation_dataset, tmp_path_factory):
    """A Models Genesis segmentation task bundle made by ``torchrun -m medfm finetune`` on two processes (2 epochs on
    the tiny dataset, one validation case per rank)."""
    folder = tmp_path_factory.mktemp("task")
    result = run_command(TORCHRUN + ["-m", "medfm", "finetune", "models_genesis_chest_ct", "--dataset_dir",
                                     str(tiny_segmentation_dataset), "--out", str(folder / "tissue_seg"), *SMALL_GENESIS_RUN])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith(f"{folder / 'tissue_seg'}: tissue_seg, segmentation of tissue")
    return folder / "tissue_seg"


@pytest.fixture(scope="module")
def cohort(tiny_segmentation_dataset, tmp_path_factory):
    """A NIfTI file, a DICOM series folder, a CSV list of two NIfTI files and a broken file: the inputs, the good
    ones in output order with the NIfTI each lies on, and the broken one."""
    folder = tmp_path_factory.mktemp("cohort")
    dicom = folder / "ct_1_dicom"
    medfm.samples.write_dicom_series(str(tiny_segmentation_dataset / "ct_1.nii.gz"), dicom, modality="CT")
    listed = folder / "more.csv"
    listed.write_text(f"image\n{tiny_segmentation_dataset / 'ct_2.nii.gz'}\n{tiny_segmentation_dataset / 'ct_3.nii.gz'}\n")
    broken = folder / "broken.nii.gz"
    broken.write_bytes(b"not a scan")
    good = [(str(tiny_segmentation_dataset / "ct_0.nii.gz"), tiny_segmentation_dataset / "ct_0.nii.gz"),
            (str(dicom), tiny_segmentation_dataset / "ct_1.nii.gz"),
            (str(tiny_segmentation_dataset / "ct_2.nii.gz"), tiny_segmentation_dataset / "ct_2.nii.gz"),
            (str(tiny_segmentation_dataset / "ct_3.nii.gz"), tiny_segmentation_dataset / "ct_3.nii.gz")]
    return [good[0][0], str(dicom), str(listed), str(broken)], good, str(broken)


@pytest.fixture(scope="module")
def one_process_run(segmentation_task, cohort, tmp_path_factory):
    inputs, _, _ = cohort
    out = tmp_path_factory.mktemp("one_process") / "out"
    result = run_command(MEDFM + ["infer", str(segmentation_task), *inputs, "--out", str(out), "--statistics"])
    return out, result


@pytest.mark.xdist_group("segmentation_task")  # one worker makes the task bundle and the reference run
def test_finetune_packages_the_best_checkpoint_with_its_provenance(segmentation_task, tiny_segmentation_dataset):
    from monai.bundle import verify_metadata

    run_dir = segmentation_task.parent / "tissue_seg_training"
    metadata = json.loads((segmentation_task / "configs" / "metadata.json").read_text())
    verify_metadata(meta_file=str(segmentation_task / "configs" / "metadata.json"), filepath=str(metadata_schema(segmentation_task)))
    made = metadata["task_bundle"]
    record = json.loads((run_dir / "fine_tuning.json").read_text())
    datalist = load_decathlon_datalist(str(tiny_segmentation_dataset / "dataset.json"), True, "training", str(tiny_segmentation_dataset))
    assert made["training_data"] == {"cases": 4, "sha256": datalist_fingerprint(datalist)}
    assert made["source_bundle"] == "models_genesis_chest_ct" and made["source_weights"] == "medfm_genesis_demo"
    assert made["source_sha256"] == sha256_of(GENESIS / "models" / "model.pt")
    assert made["key_metric"] == "val_mean_dice" and made["validation_metrics"] == record["metrics"] == metadata["eval_metrics"]
    assert 0 < made["validation_metrics"]["val_mean_dice"] <= 1 and made["epoch"] == record["epoch"] in (1, 2)
    assert metadata["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "tissue above 25 HU (synthetic)"}
    assert metadata["input_contract"] == json.loads((GENESIS / "configs" / "metadata.json").read_text())["input_contract"]
    # the saved checkpoint, unchanged; the windows the network was fine-tuned with
    packaged, trained = load_checkpoint(segmentation_task / "models" / "model.pt"), load_checkpoint(run_dir / "models" / "model.pt")
    assert packaged.keys() == trained.keys() and all(torch.equal(packaged[k], trained[k]) for k in trained)
    inference = json.loads((segmentation_task / "configs" / "inference.json").read_text())
    assert inference["patch_size"] == [32, 32, 16] and {"network_def", "preprocessing", "postprocessing", "inferer"} <= set(inference)
    card = (segmentation_task / "docs" / "README.md").read_text()
    assert f"epoch {made['epoch']}" in card and "val_mean_dice" in card and "medfm_genesis_demo" in card
    # a second finetune into the same folders is refused before any training
    again = run_command(MEDFM + ["finetune", "models_genesis_chest_ct", "--dataset_dir", str(tiny_segmentation_dataset),
                                 "--out", str(segmentation_task)])
    assert again.returncode == 1 and "already exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1


@pytest.mark.xdist_group("segmentation_task")  # one worker makes the task bundle and the reference run
def test_a_cohort_is_segmented_in_one_run_with_statistics_and_its_failure_listed(one_process_run, cohort, segmentation_task):
    out, result = one_process_run
    inputs, good, broken = cohort
    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == f"4 segmented, 0 already in {out / 'segmentations.csv'}, 1 failed"
    errors = [line for line in result.stderr.splitlines() if line.startswith("medfm: ")]
    assert errors[0].startswith(f"medfm: skipped: {broken}: ") and errors[-1].startswith("medfm: error: 1 of 5 inputs failed")
    assert [row["input"] for row in _rows(out / "failed.csv")] == [broken]

    rows = _rows(out / "segmentations.csv")
    assert [row["input"] for row in rows] == [source for source, _ in good]
    weights = f"unregistered:{sha256_of(segmentation_task / 'models' / 'model.pt')[:16]}"
    statistics = _rows(out / "statistics.csv")
    for row, (source, nifti) in zip(rows, good):
        assert (row["model"], row["weights"]) == ("tissue_seg", weights)
        label = nib.load(out / row["segmentation"])
        scan = nib.load(nifti)
        assert label.shape == scan.shape
        np.testing.assert_allclose(label.affine, scan.affine, atol=1e-4)
        values = np.asarray(label.dataobj)
        assert set(np.unique(values)) <= {0, 1}
        (stats,) = [s for s in statistics if s["input"] == source]
        assert (stats["model"], stats["weights"], stats["name"]) == ("tissue_seg", weights, "tissue above 25 HU (synthetic)")
        voxel_ml = abs(np.linalg.det(scan.affine[:3, :3])) / 1000
        assert int(stats["voxels"]) == int((values == 1).sum())
        assert float(stats["volume_ml"]) == pytest.approx(int(stats["voxels"]) * voxel_ml, rel=1e-5)
        inside = np.asarray(scan.dataobj)[values == 1]
        assert float(stats["mean"]) == pytest.approx(inside.mean(), rel=1e-4) and float(stats["max"]) == inside.max()
    # the DICOM input: a DICOM-SEG that refers to its series and is valid for the standard's validator
    dicom_row = rows[1]
    assert dicom_row["dicom_seg"].endswith("_seg.dcm") and not any(row["dicom_seg"] for row in rows if row is not dicom_row)
    seg = pydicom.dcmread(out / dicom_row["dicom_seg"])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == dicom_row["series_uid"] != ""
    assert dciodvfy_errors(out / dicom_row["dicom_seg"]) == []

    # the same command again: nothing to do, the same tables, still exit 1 for the broken input
    before = _tables(out)
    again = run_command(MEDFM + ["infer", str(segmentation_task), *inputs, "--out", str(out), "--statistics"])
    assert again.returncode == 1 and again.stdout.startswith("0 segmented, 4 already in") and _tables(out) == before


@pytest.mark.xdist_group("segmentation_task")  # one worker makes the task bundle and the reference run
def test_a_killed_run_resumes_and_two_processes_write_the_same_tables(one_process_run, cohort, segmentation_task, tmp_path):
    reference, _ = one_process_run
    inputs, _, _ = cohort
    out = tmp_path / "killed"
    command = MEDFM + ["infer", str(segmentation_task), *inputs, "--out", str(out), "--statistics"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = out / ".segmentations.csv.parts" / "index.rank0.csv"
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if part.is_file() and part.read_text().count("\n") >= 2:  # the header and one finished input
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "segmentations.csv").exists(), "killed before the end (the tables are written last)"
    resumed = run_command(command)
    assert resumed.returncode == 1 and " already in " in resumed.stdout and not resumed.stdout.startswith("0 segmented, 0 already")
    assert _tables(out) == _tables(reference)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir()), "no part or temporary left"

    shared = tmp_path / "two_processes"
    result = run_command(TORCHRUN + ["-m", "medfm", "infer", str(segmentation_task), *inputs, "--out", str(shared), "--statistics"])
    assert result.returncode == 1 and "(by 2 processes: 2, 2)" in result.stdout, result.stderr[-3000:]
    assert _tables(shared) == _tables(reference)


@pytest.mark.xdist_group("segmentation_task")
def test_the_python_api_on_arrays_equals_the_cli(one_process_run, cohort, segmentation_task, small_ct, tmp_path):
    out, _ = one_process_run
    _, good, _ = cohort
    rows = {row["input"]: row for row in _rows(out / "segmentations.csv")}
    model = medfm.load(segmentation_task)
    for source, nifti in (good[2], good[1]):  # a NIfTI file's array, and a DICOM series by its path
        scan = nib.load(nifti)
        label = model.predict(np.asarray(scan.dataobj), scan.affine) if source == str(nifti) else model.predict(source)
        written = nib.load(out / rows[source]["segmentation"])
        np.testing.assert_allclose(label.affine.numpy(), written.affine, atol=1e-4)
        np.testing.assert_array_equal(np.rint(label[0].numpy()).astype(np.uint8), np.asarray(written.dataobj))
    with pytest.raises(MedfmError, match="is not a task bundle"):
        medfm.load(GENESIS).predict(str(small_ct))
    with pytest.raises(MedfmError, match="needs its affine"):
        model.predict(np.zeros((8, 8, 8)))

    summary = medfm.embed(GENESIS, [small_ct], out=tmp_path / "embedded", progress=False, num_workers=0)
    scan = nib.load(small_ct)
    vector = medfm.load(GENESIS).embed(torch.as_tensor(np.asarray(scan.dataobj)), scan.affine)
    np.testing.assert_array_equal(vector, np.load(tmp_path / "embedded" / summary.rows[0]["embedding"]))


def test_finetune_from_a_monai_bundle_run_makes_a_classification_bundle(tmp_path):
    """VDT classification fine-tuned by the user with ``python -m monai.bundle run``, packaged with ``--from``."""
    data = write_modality_classification_table(tmp_path / "crops", size=40)
    run = tmp_path / "run"
    bundle_run(BUNDLES / "vdt_resnet3d18", ["configs/train.json"], "--dataset_dir", str(data), "--output_dir", str(run),
               "--patch_size", "[32,32,32]", "--max_epochs", "1", "--num_workers", "0", "--val_fraction", "0.25",
               "--batch_size", "3", "--pretrained", "False")
    task = tmp_path / "modality_cls"
    made = run_command(MEDFM + ["finetune", "vdt_resnet3d18", "--from", str(run), "--out", str(task)])
    assert made.returncode == 0, made.stderr
    metadata = json.loads((task / "configs" / "metadata.json").read_text())
    assert metadata["task_bundle"]["task"] == "classification" and metadata["task_bundle"]["labels"] == ["CT", "MR"]
    assert metadata["task_bundle"]["source_weights"] == "none"  # fine-tuned from scratch
    assert metadata["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "CT", "1": "MR"}

    out = tmp_path / "predictions"
    scans = [data / "CT_0.nii.gz", data / "MR_1.nii.gz"]
    result = run_command(MEDFM + ["infer", str(task), *map(str, scans), "--out", str(out)])
    assert result.returncode == 0, result.stderr
    predictions = _rows(out / "predictions.csv")
    assert list(predictions[0]) == ["input", "series_uid", "model", "weights", "prediction", "CT", "MR"]
    assert [row["input"] for row in predictions] == [str(scan) for scan in scans]
    for row in predictions:
        probabilities = {name: float(row[name]) for name in ("CT", "MR")}
        assert sum(probabilities.values()) == pytest.approx(1, abs=1e-5)
        assert row["prediction"] == max(probabilities, key=probabilities.get) and row["model"] == "modality_cls"

    probabilities = medfm.load(task).predict(np.asarray(nib.load(scans[0]).dataobj), nib.load(scans[0]).affine)
    assert {name: f"{value:.6g}" for name, value in probabilities.items()} == {name: predictions[0][name] for name in ("CT", "MR")}
    # the task bundle is a MONAI bundle: its inference runs as python -m monai.bundle run, with the same result
    bundle_run(task, ["configs/inference.json"], "--input_image", str(scans[1]), "--output_dir", str(tmp_path / "bundle_run"))
    assert _rows(tmp_path / "bundle_run" / "predictions.csv") == [predictions[1]]
    # its encoder embeds as the source bundle's embedding workflow does, from the fine-tuned weights
    embedded = run_command(MEDFM + ["embed", str(task), *map(str, scans), "--out", str(tmp_path / "embedded")])
    assert embedded.returncode == 0, embedded.stderr
    rows = _rows(tmp_path / "embedded" / "embeddings.csv")
    assert [(row["model"], row["dimension"]) for row in rows] == [("modality_cls", "512")] * 2
    vectors = [np.load(tmp_path / "embedded" / row["embedding"]) for row in rows]
    assert not np.allclose(*vectors)
    np.testing.assert_array_equal(medfm.load(task).embed(str(scans[1])), vectors[1])
    # and its train.json continues training its own weights (loaded strictly), with the class order kept
    before = sha256_of(task / "models" / "model.pt")
    bundle_run(task, ["configs/train.json"], "--dataset_dir", str(data), "--max_epochs", "1", "--num_workers", "0",
               "--val_fraction", "0.25", "--batch_size", "3")
    assert sha256_of(task / "models" / "model.pt") != before
    assert json.loads((task / "train" / "fine_tuning.json").read_text())["labels"] == ["CT", "MR"]
    # a mistaken --from says what it needs in one line
    wrong = run_command(MEDFM + ["finetune", "vdt_resnet3d18", "--from", str(data), "--out", str(tmp_path / "x")])
    assert wrong.returncode == 1 and "no fine_tuning.json" in wrong.stderr and not (tmp_path / "x").exists()
