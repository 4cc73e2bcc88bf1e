"""Every workflow of the Models Genesis bundle, driven through ``python -m monai.bundle``."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

import medfm
from medfm.weights import import_weights, load_checkpoint
from tests.conftest import (GENESIS, assert_pretraining_shared_out, assert_resumed_on_both_ranks, assert_written_by_rank_zero,
                            bundle_run, crop_nifti, run_command, torchrun_pretraining)

pytestmark = pytest.mark.slow


def _inference(bundle, source, output_dir):
    bundle_run(bundle, ["configs/inference.json"], "--input_image", str(source), "--output_dir", str(output_dir))
    stem = medfm.io.output_stem(source)
    return nib.load(output_dir / f"{stem}_restored.nii.gz"), np.load(output_dir / f"{stem}_embedding.npy")


def test_inference_on_nifti_and_dicom_keeps_geometry_and_agrees(small_ct, tmp_path):
    dicom_dir = tmp_path / "dicom" / "ct_small"
    medfm.samples.write_dicom_series(str(small_ct), dicom_dir, modality="CT")
    restored_nifti, embedding_nifti = _inference(GENESIS, small_ct, tmp_path / "out_nifti")
    restored_dicom, embedding_dicom = _inference(GENESIS, dicom_dir, tmp_path / "out_dicom")
    source = nib.load(small_ct)
    for restored in (restored_nifti, restored_dicom):
        assert restored.shape == source.shape
        np.testing.assert_allclose(restored.affine, source.affine, atol=1e-4)
        values = np.asarray(restored.dataobj)
        assert values.min() >= -1000 and values.max() <= 1000 and values.std() > 0  # written back in HU
    np.testing.assert_array_equal(np.asarray(restored_nifti.dataobj), np.asarray(restored_dicom.dataobj))
    assert embedding_nifti.shape == (512,) and embedding_nifti.dtype == np.float32
    assert np.isfinite(embedding_nifti).all()
    np.testing.assert_allclose(embedding_nifti, embedding_dicom, rtol=1e-5, atol=1e-6)
    [row] = medfm.io.read_index_rows(tmp_path / "out_dicom" / "embeddings.csv")
    assert row["series_uid"] == pydicom.dcmread(next(dicom_dir.iterdir())).SeriesInstanceUID
    assert (row["model"], row["weights"], row["dimension"]) == ("models_genesis_chest_ct", "medfm_genesis_demo", "512")


def test_inference_output_is_the_network_with_the_bundle_weights(small_ct, tmp_path):
    """Recompute the restoration in-process from models/model.pt: the workflow really loads it."""
    from monai.inferers import sliding_window_inference

    from medfm.bundles import bundle_config

    restored, _ = _inference(GENESIS, small_ct, tmp_path / "out")
    parser = bundle_config(GENESIS)
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(load_checkpoint(GENESIS / "models" / "model.pt"))
    network.eval()
    image = parser.get_parsed_content("preprocessing")({"image": str(small_ct)})["image"]
    with torch.no_grad():
        expected = sliding_window_inference(image[None], [64, 64, 32], 4, network, overlap=0.25, mode="gaussian")[0, 0]
    # the preprocessing is LPS; the sample is RAS: flip x and y back, then HU and int16 as written
    expected_hu = np.flip(expected.numpy(), axis=(0, 1)) * 2000 - 1000
    assert np.abs(np.asarray(restored.dataobj) - expected_hu).max() <= 1.0


@pytest.mark.parametrize("corruption_name", ["non-linear intensity", "in-painting", "out-painting"])
def test_shipped_weights_restore_corrupted_cubes(corruption_name):
    """The bundled weights learned the pretext: restored cubes are far closer to the original.

    (Local pixel shuffling is left out: it barely changes the low-contrast sample template.)
    """
    from medfm.demo import CORRUPTIONS
    from medfm.bundles import bundle_network

    network = bundle_network(GENESIS)
    network.load_state_dict(load_checkpoint(GENESIS / "models" / "model.pt"))
    network.eval()
    image = nib.load(medfm.samples.path("ct_head"))
    volume = np.clip((np.asarray(image.dataobj, dtype=np.float32) + 1000) / 2000, 0, 1)
    cube = torch.from_numpy(volume[3:67, 10:74, 20:52])[None]
    corruption = CORRUPTIONS[corruption_name]
    corruption.set_random_state(0)
    corrupted = corruption(cube.clone())
    with torch.no_grad():
        restored = network(corrupted[None])[0]
    assert float(((restored - cube) ** 2).mean()) < float(((corrupted - cube) ** 2).mean()) / 5


def _fine_tune(bundle, dataset, output_dir, *extra):
    return bundle_run(bundle, ["configs/train.json"], "--dataset_dir", str(dataset), "--output_dir", str(output_dir),
                      "--patch_size", "[32,32,16]", "--patches_per_volume", "2", "--max_epochs", "2",
                      "--val_interval", "1", "--num_workers", "0", "--val_fraction", "0.25", *extra)


@pytest.mark.training
def test_fine_tuning_from_pretrained_then_evaluation(tiny_segmentation_dataset, tmp_path):
    result = _fine_tune(GENESIS, tiny_segmentation_dataset, tmp_path / "ft")
    log = result.stdout + result.stderr
    assert "loaded 104 of 106 tensors; kept fresh (shape differs): ['out_tr.final_conv.weight', 'out_tr.final_conv.bias']" in log
    assert "val_mean_dice" in log
    checkpoint = load_checkpoint(tmp_path / "ft" / "models" / "model.pt")
    assert checkpoint["out_tr.final_conv.weight"].shape == (2, 64, 1, 1, 1)
    pretrained = load_checkpoint(GENESIS / "models" / "model.pt")
    assert not torch.equal(checkpoint["down_tr64.ops.0.conv1.weight"].float(), pretrained["down_tr64.ops.0.conv1.weight"].float())
    assert list((tmp_path / "ft" / "logs").glob("events.out.tfevents.*")), "TensorBoard logs"

    bundle_run(GENESIS, ["configs/train.json", "configs/evaluate.json"], "--dataset_dir", str(tiny_segmentation_dataset),
               "--output_dir", str(tmp_path / "ft"), "--patch_size", "[32,32,16]", "--val_fraction", "0.25")
    evaluation = tmp_path / "ft" / "eval"
    assert (evaluation / "metrics.csv").read_text().startswith("val_mean_dice,")
    # per-case and summary Dice name the dataset's label, not class0
    assert (evaluation / "val_mean_dice_raw.csv").read_text().splitlines()[0] == "filename,tissue above 25 HU (synthetic),mean"
    assert [row.split(",")[0] for row in (evaluation / "val_mean_dice_summary.csv").read_text().splitlines()] == \
        ["class", "tissue above 25 HU (synthetic)", "mean"]
    segmentation = nib.load(next(evaluation.glob("*_seg.nii.gz")))
    assert segmentation.get_data_dtype() == np.uint8
    source = nib.load(tiny_segmentation_dataset / "ct_3.nii.gz")
    assert segmentation.shape == source.shape
    np.testing.assert_allclose(segmentation.affine, source.affine, atol=1e-4)
    assert set(np.unique(np.asarray(segmentation.dataobj))) <= {0, 1}

    # the same validation scans as DICOM series: DICOM-SEG beside the NIfTI, referring to the series
    dicom_dataset = _as_dicom_dataset(tiny_segmentation_dataset, tmp_path / "dicom_dataset")
    bundle_run(GENESIS, ["configs/train.json", "configs/evaluate.json"], "--dataset_dir", str(dicom_dataset),
               "--output_dir", str(tmp_path / "ft"), "--eval_dir", str(tmp_path / "eval_dicom"),
               "--patch_size", "[32,32,16]", "--val_fraction", "0.25")
    seg = hd.seg.segread(next((tmp_path / "eval_dicom").glob("ct_3-*_seg.dcm")))
    series_uid = pydicom.dcmread(next((dicom_dataset / "ct_3").iterdir())).SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["tissue above 25 HU (synthetic)"]
    from_dicom = nib.load(next((tmp_path / "eval_dicom").glob("ct_3-*_seg.nii.gz")))
    np.testing.assert_allclose(from_dicom.affine, source.affine, atol=1e-4)
    assert int(seg.NumberOfFrames) == source.shape[2]


def _as_dicom_dataset(dataset, target):
    """The Decathlon dataset with each image written as a DICOM series folder (labels stay NIfTI)."""
    description = json.loads((dataset / "dataset.json").read_text())
    target.mkdir()
    for item in description["training"]:
        folder = item["image"].replace(".nii.gz", "")
        medfm.samples.write_dicom_series(str(dataset / item["image"]), target / folder, modality="CT")
        shutil.copy(dataset / item["label"], target / item["label"])
        item["image"] = folder
    (target / "dataset.json").write_text(json.dumps(description))
    return target


def test_scratch_baseline_switch_skips_the_pretrained_weights(tiny_segmentation_dataset, tmp_path):
    result = _fine_tune(GENESIS, tiny_segmentation_dataset, tmp_path / "scratch", "--pretrained", "False", "--max_epochs", "1")
    assert "pretrained weights" not in result.stdout + result.stderr
    assert (tmp_path / "scratch" / "models" / "model.pt").is_file()


@pytest.mark.training
def test_pretraining_runs_and_its_checkpoint_imports(genesis_bundle, tmp_path):
    data = tmp_path / "unlabeled"
    data.mkdir()
    crop_nifti(medfm.samples.path("ct_head"), data / "ct_a.nii.gz", (48, 48, 40))
    crop_nifti(medfm.samples.path("ct_head"), data / "ct_b.nii.gz", (40, 56, 32), (20, 10, 20))
    result = bundle_run(genesis_bundle, ["configs/pretrain.json"], "--data_dir", str(data), "--output_dir",
                        str(tmp_path / "pt"), "--patch_size", "[32,32,16]", "--crops_per_volume", "2",
                        "--max_epochs", "2", "--num_workers", "0")
    assert (result.stdout + result.stderr).count("train_loss:") == 2 * 2  # 2 epochs x 2 volumes (1 per batch)
    final = tmp_path / "pt" / "models" / "model.pt"
    report = import_weights(genesis_bundle, final, dtype="float16")
    assert report.missing_keys == [] and load_checkpoint(genesis_bundle / "models" / "model.pt")["out_tr.final_conv.weight"].dtype == torch.float16


@pytest.mark.training
def test_pretraining_resumes_with_its_learning_rate_schedule(genesis_bundle, tmp_path):
    data = tmp_path / "unlabeled"
    data.mkdir()
    for index, offset in enumerate([(0, 0, 0), (20, 10, 20)]):
        crop_nifti(medfm.samples.path("ct_head"), data / f"ct_{index}.nii.gz", (40, 40, 32), offset)
    arguments = ["--data_dir", str(data), "--output_dir", str(tmp_path / "pt"), "--patch_size", "[32,32,16]",
                 "--crops_per_volume", "2", "--num_workers", "0"]
    bundle_run(genesis_bundle, ["configs/pretrain.json"], *arguments, "--max_epochs", "1")
    resumed = bundle_run(genesis_bundle, ["configs/pretrain.json"], *arguments, "--max_epochs", "2", "--resume", "True")
    assert "1 epochs (2 iterations) done" in resumed.stdout + resumed.stderr
    state = load_checkpoint(tmp_path / "pt" / "training_state" / "training_state_epoch=2.pt")
    assert state["trainer"]["iteration"] == 4
    assert state["lr_scheduler"]["last_epoch"] == 2, "the schedule went on from epoch 1 (a fresh one would be at 1)"


def test_pretraining_on_two_processes_shares_out_the_scans_and_resumes(genesis_bundle, tmp_path):
    data = tmp_path / "unlabeled"
    data.mkdir()
    scans = {str(crop_nifti(medfm.samples.path("ct_head"), data / f"ct_{index}.nii.gz", (40, 40, 32), (8 * index, 0, 8)))
             for index in range(4)}
    output = tmp_path / "pt"
    small = ("--data_dir", str(data), "--patch_size", "[32,32,16]", "--crops_per_volume", "2", "--num_workers", "0")
    log, seen = torchrun_pretraining(genesis_bundle, ["configs/pretrain.json"], output, *small)
    assert_pretraining_shared_out(seen, scans)
    assert len(seen[0]) == len(seen[1]) == 2 * 2, "2 volumes x 2 crops per rank"
    assert_written_by_rank_zero(output, log=log)
    log, _ = torchrun_pretraining(genesis_bundle, ["configs/pretrain.json"], output, *small, epochs=2, resume=True)
    assert_resumed_on_both_ranks(output, log, "training_state", iterations_per_epoch=2)
    assert_written_by_rank_zero(output, epochs=2, log=log, runs=2)


@pytest.mark.training
def test_multi_gpu_config_runs_ddp_with_torchrun_on_cpu(tiny_segmentation_dataset, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    output = tmp_path / "ddp"
    # test-only overlay: every rank lists the volumes it trained on
    record = tmp_path / "record_inputs.json"
    record.write_text(json.dumps({"run": [
        "$@train#trainer.add_event_handler(monai.engines.workflow.Events.ITERATION_COMPLETED, lambda engine: open("
        "@output_dir + '/inputs_rank' + str(torch.distributed.get_rank()) + '.txt', 'a').write("
        "''.join(item['image'].meta['filename_or_obj'] + chr(10) for item in engine.state.batch)))",
        "$@train#trainer.run()"]}))
    result = bundle_run(GENESIS, ["configs/train.json", "configs/multi_gpu_train.json", str(record)], "--dataset_dir",
                        str(tiny_segmentation_dataset), "--output_dir", str(output), "--patch_size", "[32,32,16]",
                        "--patches_per_volume", "2", "--volumes_per_batch", "1", "--max_epochs", "1", "--val_interval", "1",
                        "--num_workers", "0", "--val_fraction", "0.5", launcher=torchrun)
    log = result.stdout + result.stderr
    assert log.count("loaded 104 of 106 tensors") == 2, "each rank loads the pretrained weights"
    # DistributedSampler: each rank trains on its own half of the 2 training volumes
    seen = [(output / f"inputs_rank{rank}.txt").read_text().split() for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 2, "1 iteration x 2 crops of one volume per rank"
    assert len(set(seen[0])) == len(set(seen[1])) == 1 and set(seen[0]) != set(seen[1])
    assert {Path(name).name for name in seen[0] + seen[1]} == {"ct_0.nii.gz", "ct_1.nii.gz"}
    # rank 0 alone writes checkpoints, training state and logs
    assert_written_by_rank_zero(output)
    assert log.count("Epoch: 1/1, Iter: 1/1") == 1, "only rank 0 logs iterations"


@pytest.mark.training
def test_training_resumes_after_being_killed_in_epoch_two(tiny_segmentation_dataset, tmp_path):
    output = tmp_path / "resume"
    arguments = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", "--meta_file",
                 "configs/metadata.json", "--bundle_root", str(GENESIS), "--dataset_dir", str(tiny_segmentation_dataset),
                 "--output_dir", str(output), "--patch_size", "[32,32,16]", "--patches_per_volume", "2",
                 "--volumes_per_batch", "1", "--max_epochs", "3", "--val_interval", "3", "--num_workers", "0", "--val_fraction", "0.25"]
    process = subprocess.Popen(arguments, cwd=GENESIS, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "Epoch: 2/3, Iter: 1/3" in line:
            process.kill()  # SIGKILL in the middle of epoch 2: no handler runs
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "".join(lines[-40:])
    states = output / "training_state"
    assert [p.name for p in states.iterdir()] == ["training_state_epoch=1.pt"], "only the finished epoch is saved"
    after_one = load_checkpoint(states / "training_state_epoch=1.pt")
    assert after_one["trainer"]["iteration"] == 3 and after_one["trainer"]["epoch_length"] == 3  # 1 epoch of 3
    first_step = next(iter(after_one["optimizer"]["state"].values()))["step"]
    assert float(first_step) == 3

    resumed = bundle_run(GENESIS, ["configs/train.json"], *arguments[10:], "--resume", "True")
    log = resumed.stdout + resumed.stderr
    assert "1 epochs (3 iterations) done" in log
    assert "Epoch: 1/3" not in log and "Epoch: 2/3, Iter: 1/3" in log and "Epoch: 3/3, Iter: 3/3" in log
    final = load_checkpoint(states / "training_state_epoch=3.pt")
    assert [p.name for p in states.iterdir()] == ["training_state_epoch=3.pt"]
    assert final["trainer"]["iteration"] == 9
    # Adam's step count and moments carried on from epoch 1 (a fresh optimizer would count 6)
    assert float(next(iter(final["optimizer"]["state"].values()))["step"]) == 9
    nothing_to_resume = run_command(arguments[:12] + ["--output_dir", str(tmp_path / "empty")] + arguments[14:]
                                    + ["--resume", "True"], cwd=GENESIS)
    assert nothing_to_resume.returncode != 0 and "nothing to resume from" in nothing_to_resume.stderr + nothing_to_resume.stdout


def test_a_schedule_that_never_validates_fails_before_training(tiny_segmentation_dataset, tmp_path):
    """The default --val_interval is 5: one epoch would validate never and save no checkpoint."""
    result = run_command([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", "--meta_file",
                          "configs/metadata.json", "--bundle_root", str(GENESIS), "--dataset_dir", str(tiny_segmentation_dataset),
                          "--output_dir", str(tmp_path / "ft"), "--patch_size", "[32,32,16]", "--num_workers", "0",
                          "--val_fraction", "0.25", "--max_epochs", "1"], cwd=GENESIS)
    assert result.returncode != 0, result.stderr[-2000:]
    assert "no validation would run in epochs 1 to 1 (--val_interval 5), so no checkpoint would be saved" in result.stderr
    assert not (tmp_path / "ft" / "models" / "model.pt").exists()


def test_evaluation_without_a_fine_tuned_checkpoint_says_so(tiny_segmentation_dataset, tmp_path):
    result = run_command([sys.executable, "-m", "monai.bundle", "run", "--config_file", "['configs/train.json','configs/evaluate.json']",
                          "--meta_file", "configs/metadata.json", "--bundle_root", str(GENESIS), "--dataset_dir",
                          str(tiny_segmentation_dataset), "--output_dir", str(tmp_path / "never_trained"), "--patch_size",
                          "[32,32,16]", "--val_fraction", "0.25"], cwd=GENESIS)
    assert result.returncode != 0
    assert "never_trained/models/model.pt: no fine-tuned checkpoint to evaluate; run configs/train.json" in result.stderr

