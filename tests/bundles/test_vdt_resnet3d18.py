"""Every workflow of the VDT 3D ResNet-18 bundle, driven through ``python -m monai.bundle``."""

import csv
import shutil
import re
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import medfm
from medfm.networks import VDTResNetUNet, vdt_resnet18
from medfm.weights import load_checkpoint
from tests.conftest import (BUNDLES, assert_resumed_on_both_ranks, assert_written_by_rank_zero,
                            bundle_run, run_command, torchrun_pretraining,
                            write_modality_classification_table)

pytestmark = pytest.mark.slow

VDT = BUNDLES / "vdt_resnet3d18"
UPSTREAM_NAME = "res3d18_imagenet_BN_73.07-5ff2ecb7.pth"


@pytest.fixture
def vdt_bundle(tmp_path):
    target = tmp_path / "vdt_resnet3d18"
    shutil.copytree(VDT, target, ignore=shutil.ignore_patterns("eval", "finetune*", "pretrain"))
    return target


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """ImageFolder tree of real 2D images: axial slices of the embedded CT and MR (grey PNG), and
    three adjacent MR slices as the colours of RGB (JPEG) and RGBA (PNG) images, so every reader path runs."""
    root = tmp_path_factory.mktemp("image_folder")
    for name, sample in (("ct_head", "ct_head"), ("mr_head", "mr_head_t1")):
        volume = np.asarray(nib.load(medfm.samples.path(sample)).dataobj, dtype=np.float32)
        volume = (volume - volume.min()) / (volume.max() - volume.min()) * 255
        (root / name).mkdir()
        for index, z in enumerate(np.linspace(volume.shape[2] * 0.3, volume.shape[2] * 0.7, 6).astype(int)):
            if index < 4:
                Image.fromarray(volume[:, :, z].astype(np.uint8)).save(root / name / f"{z}.png")
            else:
                rgb = np.stack([volume[:, :, z + d] for d in (-1, 0, 1)], axis=-1).astype(np.uint8)
                image = Image.fromarray(rgb)
                image.save(root / name / f"{z}.jpg") if index == 4 else image.convert("RGBA").save(root / name / f"{z}.png")
    return root


@pytest.fixture(scope="module")
def crop_classification_dataset(tmp_path_factory):
    """48^3 crops of the real head CT and MRI labelled by modality (``dataset.csv``)."""
    return write_modality_classification_table(tmp_path_factory.mktemp("crops"))


@pytest.mark.training
def test_pretraining_on_an_image_folder_gives_weights_for_both_geometries(vdt_bundle, image_folder, tmp_path):
    result = bundle_run(vdt_bundle, ["configs/pretrain.json"], "--data_dir", str(image_folder), "--output_dir",
                        str(tmp_path / "pt"), "--patch_size", "[32,32]", "--batch_size", "4", "--max_epochs", "2",
                        "--num_workers", "0", "--val_fraction", "0.25", "--learning_rate", "0.01")
    log = result.stdout + result.stderr
    assert log.count("train_loss:") == 4 and log.count("val_accuracy") >= 2  # 9 images / 4 per batch, 2 epochs
    state = load_checkpoint(tmp_path / "pt" / "models" / "model.pt")
    assert state["fc.weight"].shape == (2, 512)
    vdt_resnet18(num_classes=2, pretraining_geometry=True).load_state_dict(state)
    vdt_resnet18(num_classes=2).load_state_dict(state)  # the fine-tuning geometry shares every tensor


def test_pretraining_on_two_processes_shares_out_the_images_and_resumes(vdt_bundle, image_folder, tmp_path):
    output = tmp_path / "pt"
    # 12 images, 1/6 held out: 10 for training, 5 per rank in batches of 2 (the last one dropped)
    small = ("--data_dir", str(image_folder), "--patch_size", "[32,32]", "--batch_size", "2", "--num_workers", "0",
             "--val_fraction", "0.17", "--learning_rate", "0.01")
    log, seen = torchrun_pretraining(vdt_bundle, ["configs/pretrain.json"], output, *small)
    assert len(seen[0]) == len(seen[1]) == 4 and not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) <= {str(p) for p in image_folder.rglob("*.*")}
    assert log.count("val_accuracy") >= 1
    assert_written_by_rank_zero(output, log=log)
    log, _ = torchrun_pretraining(vdt_bundle, ["configs/pretrain.json"], output, *small, epochs=2, resume=True)
    assert_resumed_on_both_ranks(output, log, "training_state", iterations_per_epoch=2)
    assert_written_by_rank_zero(output, epochs=2, log=log, runs=2)


def _fine_tune(bundle, dataset, output_dir, *overrides, config="configs/train.json"):
    return bundle_run(bundle, [config], "--dataset_dir", str(dataset), "--output_dir", str(output_dir),
                      "--patch_size", "[32,32,32]", "--max_epochs", "1", "--num_workers", "0", "--val_fraction", "0.25",
                      *overrides)


@pytest.mark.training
def test_classification_fine_tuning_evaluation_and_inference(vdt_bundle, crop_classification_dataset, tmp_path):
    (vdt_bundle / "models").mkdir(exist_ok=True)
    torch.save(vdt_resnet18(num_classes=1000).state_dict(), vdt_bundle / "models" / "model.pt")  # an ImageNet head
    result = _fine_tune(vdt_bundle, crop_classification_dataset, tmp_path / "ft", "--batch_size", "3")
    log = result.stdout + result.stderr
    assert "loaded 120 of 122 tensors; kept fresh (shape differs): ['fc.weight', 'fc.bias']" in log
    assert "val_auc" in log and "val_accuracy" in log
    fine_tuned = tmp_path / "ft" / "models" / "model.pt"
    assert load_checkpoint(fine_tuned)["fc.weight"].shape == (2, 512)

    bundle_run(vdt_bundle, ["configs/train.json", "configs/evaluate.json"], "--dataset_dir",
               str(crop_classification_dataset), "--output_dir", str(tmp_path / "ft"), "--patch_size", "[32,32,32]",
               "--val_fraction", "0.25")
    header, *rows = csv.reader((tmp_path / "ft" / "eval" / "predictions.csv").open())
    assert header == ["input", "CT", "MR"]  # the classes are the table's labels
    assert len(rows) == 2 and all(abs(float(a) + float(b) - 1) < 1e-5 for _, a, b in rows)
    assert (tmp_path / "ft" / "eval" / "metrics.csv").read_text().startswith("val_auc")

    out = tmp_path / "infer"
    bundle_run(vdt_bundle, ["configs/inference.json"], "--ckpt_path", str(fine_tuned), "--num_classes", "2",
               "--output_dir", str(out), "--input_image", str(crop_classification_dataset / "MR_1.nii.gz"))
    header, (name, *probabilities) = csv.reader((out / "predictions.csv").open())
    assert header == ["input", "class_0", "class_1"]
    assert name.endswith("MR_1.nii.gz") and len(probabilities) == 2 and abs(sum(map(float, probabilities)) - 1) < 1e-5
    assert np.load(next(out.glob("MR_1-*_embedding.npy"))).shape == (512,)

    # the from-scratch baseline (--pretrained False): tests/test_task_bundles.py fine-tunes VDT that way


@pytest.mark.training
def test_segmentation_fine_tuning_loads_the_encoder_and_trains_the_decoder(vdt_bundle, tiny_segmentation_dataset, tmp_path):
    (vdt_bundle / "models").mkdir(exist_ok=True)
    torch.save(vdt_resnet18(feed_forward=False).state_dict(), vdt_bundle / "models" / "model.pt")
    result = _fine_tune(vdt_bundle, tiny_segmentation_dataset, tmp_path / "seg", "--patches_per_volume", "1", "--val_interval", "1",
                        "--modality", "CT", config="configs/train_segmentation.json")
    encoder = len([k for k in vdt_resnet18(feed_forward=False).state_dict()])
    total = len(VDTResNetUNet(out_channels=2).state_dict())
    assert f"loaded {encoder} of {total} tensors" in result.stdout + result.stderr
    assert "val_mean_dice" in result.stdout + result.stderr
    VDTResNetUNet(out_channels=2).load_state_dict(load_checkpoint(tmp_path / "seg" / "models" / "model.pt"))
    # its evaluation overlay: Dice per case under the label's name, segmentations in the input geometry
    bundle_run(vdt_bundle, ["configs/train_segmentation.json", "configs/evaluate_segmentation.json"], "--dataset_dir",
               str(tiny_segmentation_dataset), "--output_dir", str(tmp_path / "seg"), "--patch_size", "[32,32,32]",
               "--val_fraction", "0.25", "--modality", "CT", "--num_workers", "0")
    assert (tmp_path / "seg" / "eval" / "val_mean_dice_raw.csv").read_text().startswith(
        "filename,tissue above 25 HU (synthetic),mean\n")
    segmentation = nib.load(next((tmp_path / "seg" / "eval").glob("*_seg.nii.gz")))
    source = nib.load(tiny_segmentation_dataset / "ct_3.nii.gz")
    assert segmentation.shape == source.shape and segmentation.get_data_dtype() == np.uint8


def test_embedding_inference_on_the_sample_and_without_weights(vdt_bundle, tmp_path):
    result = run_command([sys.executable, "-m", "medfm.cli", "infer", str(vdt_bundle), medfm.samples.path("mr_head_t1"),
                          "--out", str(tmp_path / "none")])
    assert result.returncode == 1 and "models/model.pt: missing" in result.stderr
    assert f"'medfm weights import {vdt_bundle} FILE'" in result.stderr  # the folder being run, not the repository's
    assert "no download is registered" in result.stderr and "weights fetch" not in result.stderr
    (vdt_bundle / "models").mkdir(exist_ok=True)
    torch.save(vdt_resnet18(feed_forward=False).state_dict(), vdt_bundle / "models" / "model.pt")
    bundle_run(vdt_bundle, ["configs/inference.json"], "--output_dir", str(tmp_path / "out"))
    embedding = np.load(next((tmp_path / "out").glob("mr_head_t1_itk-*_embedding.npy")))
    assert embedding.shape == (512,) and np.isfinite(embedding).all() and embedding.std() > 0
    assert not (tmp_path / "out" / "predictions.csv").exists()  # no classification head: embedding only


class MmcvConfig:
    """Stands for the mmcv Config object some mmcls checkpoints pickle into their meta."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __setstate__(self, state):
        open(state["marker"], "w").close()  # would run only if the real class were unpickled


def _save_mmcls_checkpoint(path, foreign_meta_marker=None, legacy=True) -> torch.nn.Module:
    """The upstream layout: {'meta', 'state_dict'} with 'backbone.' keys and an mmcls 'head.fc'."""
    torch.manual_seed(1)
    network = vdt_resnet18(num_classes=1000, pretraining_geometry=True)
    state = {f"backbone.{k}": v for k, v in network.state_dict().items() if not k.startswith("fc.")}
    state.update({"head.fc.weight": network.fc.weight.detach(), "head.fc.bias": network.fc.bias.detach()})
    meta = {"mmcv_version": "1.3.8", "epoch": 100, "CLASSES": ["tench", "goldfish"]}
    if foreign_meta_marker:
        meta["config"] = MmcvConfig(str(foreign_meta_marker))
    torch.save({"meta": meta, "state_dict": state}, path, _use_new_zipfile_serialization=not legacy)
    return network


def test_import_of_upstream_layouts_through_the_cli(vdt_bundle, tmp_path):
    upstream = tmp_path / "res3d18_downloaded.pth"
    network = _save_mmcls_checkpoint(upstream)
    medfm_cli = [sys.executable, "-m", "medfm.cli", "weights"]
    result = run_command(medfm_cli + ["import", str(vdt_bundle), str(upstream)])
    assert result.returncode == 0, result.stderr
    assert "not a registered checkpoint" in result.stdout and "missing keys: 0, unexpected keys: 0" in result.stdout
    imported = load_checkpoint(vdt_bundle / "models" / "model.pt")
    assert len(imported) == 120 and "fc.weight" not in imported  # the bundle network is the 512-d encoder
    torch.testing.assert_close(imported["layer4.1.conv2.weight"], network.layer4[1].conv2.weight.detach())
    assert run_command(medfm_cli + ["verify", str(vdt_bundle)]).returncode == 0

    marker = tmp_path / "executed"
    pickled_config = tmp_path / "with_config.pth"
    _save_mmcls_checkpoint(pickled_config, foreign_meta_marker=marker, legacy=False)
    refused = run_command(medfm_cli + ["import", str(vdt_bundle), str(pickled_config)])
    assert refused.returncode == 1 and "MmcvConfig" in refused.stderr and "--strip_objects" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    stripped = run_command(medfm_cli + ["import", str(vdt_bundle), str(pickled_config), "--strip_objects"])
    assert stripped.returncode == 0, stripped.stderr
    assert not marker.exists()


def test_the_registered_file_name_must_carry_the_published_hash_prefix(vdt_bundle, tmp_path, monkeypatch):
    from dataclasses import replace

    from medfm.errors import WeightsError
    from medfm.weights import import_weights, registry, sha256_of

    named = tmp_path / UPSTREAM_NAME
    _save_mmcls_checkpoint(named)
    with pytest.raises(WeightsError, match=r"does not match registered weights 'vdt_resnet3d18_imagenet' \(5ff2ecb7\)"):
        import_weights(vdt_bundle, named)
    assert not (vdt_bundle / "models" / "model.pt").exists()
    # the same check passes a file whose digest starts with the registered prefix
    entry = registry.REGISTRY["vdt_resnet3d18_imagenet"]
    monkeypatch.setitem(registry.REGISTRY, entry.name, replace(entry, sha256=sha256_of(named)[:8]))
    report = import_weights(vdt_bundle, named)
    assert report.weights == "vdt_resnet3d18_imagenet" and report.missing_keys == []



def test_a_batch_larger_than_the_training_cases_fails_before_training(vdt_bundle, crop_classification_dataset, tmp_path):
    """train.json drops the last incomplete batch: with more batch than cases MONAI would skip training and exit 0."""
    result = run_command([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", "--meta_file",
                          "configs/metadata.json", "--bundle_root", str(vdt_bundle), "--dataset_dir", str(crop_classification_dataset),
                          "--output_dir", str(tmp_path / "ft"), "--patch_size", "[32,32,32]", "--num_workers", "0",
                          "--val_fraction", "0.25", "--max_epochs", "1", "--batch_size", "64", "--pretrained", "False"], cwd=vdt_bundle)
    assert result.returncode != 0, result.stderr[-2000:]
    assert re.search(r"no training step would run: \d+ training case\(s\) with batch size 64 and drop_last give no batch",
                     result.stderr), result.stderr[-2000:]



def test_fine_tuning_without_installed_weights_says_to_install_them_or_train_from_scratch(vdt_bundle, crop_classification_dataset, tmp_path):
    assert not (vdt_bundle / "models" / "model.pt").exists()
    result = run_command([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", "--meta_file",
                          "configs/metadata.json", "--bundle_root", str(vdt_bundle), "--dataset_dir", str(crop_classification_dataset),
                          "--output_dir", str(tmp_path / "ft"), "--num_workers", "0"], cwd=vdt_bundle)
    # one line at the end, not buried in MONAI's traceback, naming the folder being run
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"medfm: error: {vdt_bundle}/models/model.pt: no pre-trained weights to start from; no download is registered: "
        "get the checkpoint (vdt_resnet3d18_imagenet: https://github.com/urmagicsmine/CSPR (README links: Google Drive "
        "file id 1TlaGFA154RfunoLFzvP8SRjzVL8zGTOI, and Baidu Pan); no stable direct URL, so import only) and run "
        f"'medfm weights import {vdt_bundle} FILE', or fine-tune from scratch with --pretrained False")
