"""Every workflow of the Universal Model / SAR bundle, driven through ``python -m monai.bundle``."""

import shutil
import sys

import nibabel as nib
import numpy as np
import pytest

import medfm
from medfm.networks import GenesisUNet3D
from medfm.weights import import_weights, load_checkpoint
from tests.conftest import (BUNDLES, assert_pretraining_shared_out, assert_resumed_on_both_ranks, assert_written_by_rank_zero,
                            bundle_run, crop_nifti, run_command, save_upstream_checkpoint, torchrun_pretraining)

pytestmark = pytest.mark.slow

SAR = BUNDLES / "universal_model_sar"
SMALL_PRETRAINING = ["--patch_size", "[32,32,16]", "--crop_sizes", "[[24,24,12],[32,32,16],[48,48,24]]",
                     "--crops_per_volume", "2", "--num_workers", "0"]


@pytest.fixture
def sar_bundle(tmp_path):
    """A private copy of the bundle holding weights written the way the upstream trainer writes them."""
    target = tmp_path / "universal_model_sar"
    shutil.copytree(SAR, target, ignore=shutil.ignore_patterns("eval", "finetune", "pretrain"))
    # not named Universal_model.pt: the importer would (rightly) refuse a file of that name with another hash
    save_upstream_checkpoint(tmp_path / "upstream_style.pt", seed=3)
    report = import_weights(target, tmp_path / "upstream_style.pt")
    assert report.missing_keys == [] and report.unexpected_keys == []
    return target


@pytest.mark.training
def test_pretraining_logs_all_three_tasks_and_keeps_the_heads_apart(tmp_path):
    bundle = tmp_path / "universal_model_sar"
    shutil.copytree(SAR, bundle)
    result = bundle_run(bundle, ["configs/pretrain.json"], "--output_dir", str(tmp_path / "pt"), "--max_epochs", "2",
                        *SMALL_PRETRAINING)
    assert (result.stdout + result.stderr).count("train_loss:") == 2  # 2 epochs x 1 batch (CT + MR sample)
    rows = (tmp_path / "pt" / "pretext_losses.csv").read_text().splitlines()
    assert rows[0] == "epoch,restoration,scale,domain,scale_accuracy,domain_accuracy" and len(rows) == 3
    unet = load_checkpoint(tmp_path / "pt" / "models" / "model.pt")
    assert set(unet) == set(GenesisUNet3D().state_dict()), "bundle weights keep the released file's keys"
    heads = load_checkpoint(tmp_path / "pt" / "models" / "heads.pt")
    assert {k.split(".")[0] for k in heads} == {"scale_head", "domain_head"}
    assert import_weights(bundle, tmp_path / "pt" / "models" / "model.pt").missing_keys == []


def test_pretraining_on_two_processes_shares_out_ct_and_mr_scans_and_resumes(tmp_path):
    data = tmp_path / "unlabeled"
    data.mkdir()
    scans = set()
    for index in range(2):  # named as the default --image_glob {"CT": "ct_*.nii*", "MR": "mr_*.nii*"} expects
        scans.add(str(crop_nifti(medfm.samples.path("ct_head"), data / f"ct_{index}.nii.gz", (72, 72, 40), (16 * index, 8, 8))))
        scans.add(str(crop_nifti(medfm.samples.path("mr_head_t1"), data / f"mr_{index}.nii.gz", (72, 72, 40), (16 * index, 8, 8))))
    output = tmp_path / "pt"
    # 2 iterations per rank and epoch, gradients accumulated over both: one Adam step per epoch
    small = ("--data_dir", str(data), "--volumes_per_batch", "1", "--accumulate", "2", *SMALL_PRETRAINING)
    log, seen = torchrun_pretraining(SAR, ["configs/pretrain.json"], output, *small)
    assert_pretraining_shared_out(seen, scans)
    assert_written_by_rank_zero(output, log=log)
    assert (output / "models" / "heads.pt").is_file() and len((output / "pretext_losses.csv").read_text().splitlines()) == 2
    adam_steps = {int(s["step"]) for s in load_checkpoint(output / "training_state" / "training_state_epoch=1.pt")["optimizer"]["state"].values()}
    assert adam_steps == {1}
    log, _ = torchrun_pretraining(SAR, ["configs/pretrain.json"], output, *small, epochs=2, resume=True)
    assert_resumed_on_both_ranks(output, log, "training_state", iterations_per_epoch=2)
    assert_written_by_rank_zero(output, epochs=2, log=log, runs=2)
    adam_steps = {int(s["step"]) for s in load_checkpoint(output / "training_state" / "training_state_epoch=2.pt")["optimizer"]["state"].values()}
    assert adam_steps == {2}


def _inference(bundle, source, output_dir, *extra):
    bundle_run(bundle, ["configs/inference.json"], "--input_image", str(source), "--output_dir", str(output_dir), *extra)
    stem = medfm.io.output_stem(source)
    return nib.load(output_dir / f"{stem}_restored.nii.gz"), np.load(output_dir / f"{stem}_embedding.npy")


def test_inference_on_mri_and_on_a_ct_dicom_series(sar_bundle, small_ct, tmp_path):
    mr = medfm.samples.path("mr_head_t1")
    restored, embedding = _inference(sar_bundle, mr, tmp_path / "mr")
    source = nib.load(mr)
    assert restored.shape == source.shape and embedding.shape == (512,) and np.isfinite(embedding).all()
    np.testing.assert_allclose(restored.affine, source.affine, atol=1e-4)
    values, original = np.asarray(restored.dataobj), np.asarray(source.dataobj)
    assert original.min() - 1e-3 <= values.min() and values.max() <= original.max() + 1e-3  # back in MR units

    series = tmp_path / "ct_series"
    medfm.samples.write_dicom_series(str(small_ct), series, modality="CT")
    restored_ct, embedding_ct = _inference(sar_bundle, series, tmp_path / "ct")
    values = np.asarray(restored_ct.dataobj)
    assert restored_ct.shape == nib.load(small_ct).shape and -1000 <= values.min() and values.max() <= 1000  # HU
    [row] = medfm.io.read_index_rows(tmp_path / "ct" / "embeddings.csv")
    assert row["model"] == "universal_model_sar" and row["weights"].startswith("unregistered:")
    assert np.abs(embedding - embedding_ct).max() > 1e-3, "CT and MRI embeddings differ"


def test_inference_without_weights_says_how_to_get_them(tmp_path):
    result = run_command([sys.executable, "-m", "medfm.cli", "infer", str(SAR), medfm.samples.path("mr_head_t1"),
                          "--out", str(tmp_path / "out")])
    assert result.returncode == 1
    assert "models/model.pt: missing; run 'medfm weights fetch universal_model_sar'" in result.stderr
    assert not (tmp_path / "out").exists()
    # the same as MONAI runs the bundle: the hint is the last line, with no traceback before it
    result = bundle_run(SAR, ["configs/inference.json"], "--input_image", medfm.samples.path("mr_head_t1"),
                        "--output_dir", str(tmp_path / "out"), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"medfm: error: {SAR}/models/model.pt: missing; run 'medfm weights fetch universal_model_sar' (downloads "
        "universal_model) or 'medfm weights import universal_model_sar FILE'")
    # and the whole traceback on request
    result = bundle_run(SAR, ["configs/inference.json"], "--input_image", medfm.samples.path("mr_head_t1"),
                        "--output_dir", str(tmp_path / "out"), check=False, env={"MEDFM_TRACEBACK": "1"})
    assert "Traceback" in result.stderr and "WeightsError" in result.stderr


def _fine_tune(bundle, dataset, output_dir, *extra, val_fraction=0.25):
    return bundle_run(bundle, ["configs/train.json"], "--dataset_dir", str(dataset), "--output_dir",
                      str(output_dir), "--num_classes", "2", "--patch_size", "[32,32,16]", "--patches_per_volume", "2",
                      "--max_epochs", "1", "--val_interval", "1", "--num_workers", "0", "--val_fraction", str(val_fraction),
                      "--modality", "CT", *extra)


@pytest.mark.training
def test_fine_tuning_from_pretrained_then_evaluation_and_the_scratch_baseline(sar_bundle, tiny_segmentation_dataset, tmp_path):
    result = _fine_tune(sar_bundle, tiny_segmentation_dataset, tmp_path / "ft")
    assert "loaded 104 of 106 tensors" in result.stdout + result.stderr
    bundle_run(sar_bundle, ["configs/train.json", "configs/evaluate.json"], "--dataset_dir", str(tiny_segmentation_dataset),
               "--output_dir", str(tmp_path / "ft"), "--num_classes", "2", "--patch_size", "[32,32,16]",
               "--val_fraction", "0.25", "--modality", "CT")
    assert (tmp_path / "ft" / "eval" / "metrics.csv").read_text().startswith("val_mean_dice,")
    segmentation = nib.load(next((tmp_path / "ft" / "eval").glob("ct_3-*_seg.nii.gz")))
    assert segmentation.shape == nib.load(tiny_segmentation_dataset / "ct_3.nii.gz").shape
    scratch = _fine_tune(sar_bundle, tiny_segmentation_dataset, tmp_path / "scratch", "--pretrained", "False")
    assert "pretrained weights" not in scratch.stdout + scratch.stderr

