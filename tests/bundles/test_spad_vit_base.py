"""Every workflow of the SPAD-ViT bundle on real 2D and 3D inputs, driven through ``python -m monai.bundle``.

Tiny variants (width 64, 2 blocks) keep the runs short; the code path is the one ViT-B runs.
"""

import argparse
import csv
import json
import shutil
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from pydicom.data import get_testdata_file

import medfm
from medfm.networks import SpadTokenizer, SpadViT
from medfm.networks.spad_vit import checkpoint_filter_fn
from medfm.weights import load_checkpoint, sha256_of
from tests.conftest import (BUNDLES, REPO, assert_pretraining_shared_out, assert_resumed_on_both_ranks, assert_written_by_rank_zero,
                            bundle_run, run_command, torchrun_pretraining)

pytestmark = pytest.mark.slow

SPAD = BUNDLES / "spad_vit_base"
TINY = {"embed_dim": 64, "depth": 2, "num_heads": 4}
TINY_ARGS = [arg for key, value in TINY.items() for arg in (f"--network_def#{key}", str(value))]
TINY_DECODER = ["--network_def#decoder_channels", "[8,8,16,16,32,32]"]
TINY_TOKENIZER = ["--tokenizer_def#channels", "[8,16,32]", "--codebook_size", "64"]
PNGS = ["itk_pd_slice_png", "itk_t1_slice_png", "itk_sagittal_slice_png", "itk_fat_mri_slice_png"]


@pytest.fixture
def spad_bundle(tmp_path):
    target = tmp_path / "spad_vit_base"
    shutil.copytree(SPAD, target, ignore=shutil.ignore_patterns("eval", "finetune*", "pretrain", "models"))
    return target


def install_tiny_weights(bundle, seed=0) -> SpadViT:
    torch.manual_seed(seed)
    network = SpadViT(in_channels=1, **TINY)
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    return network


@pytest.fixture(scope="module")
def mixed_datalist(real_file, tmp_path_factory):
    """Unlabelled real images of every geometry: 3D CT and MR, a Siemens mosaic EPI, a 3-slice MRI,
    and 2D PNG slices (palette and RGB)."""
    items = [{"image": medfm.samples.path("ct_head")}, {"image": medfm.samples.path("mr_head_t1")},
             {"image": str(real_file("siemens_mosaic_mr"))}, {"image": str(real_file("itk_pd_mha"))}]
    real_file("itk_pd_mha_raw")
    items += [{"image": str(real_file(name))} for name in PNGS[:2]]
    path = tmp_path_factory.mktemp("pretrain") / "datalist.json"
    path.write_text(json.dumps(items))
    return path


@pytest.fixture(scope="module")
def slice_table(real_file, tmp_path_factory):
    """dataset.csv of real 2D images (PNG slices and a DICOM CT slice): brain vs body; the last two
    rows (validation) hold one of each class."""
    folder = tmp_path_factory.mktemp("slices")
    rows = [(real_file(PNGS[0]), "brain"), (real_file(PNGS[3]), "body"), (real_file(PNGS[1]), "brain"),
            (get_testdata_file("CT_small.dcm"), "body"), (real_file(PNGS[2]), "brain"), (real_file(PNGS[3]), "body")]
    with open(folder / "dataset.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", "label"])
        writer.writerows((str(path), label) for path, label in rows)
    return folder


def test_inference_embeds_3d_volumes_2d_images_and_a_dicom_slice(spad_bundle, real_file, tmp_path):
    inputs = [medfm.samples.path("ct_head"), str(real_file("itk_t1_slice_png")), get_testdata_file("CT_small.dcm")]
    result = run_command([sys.executable, "-m", "medfm.cli", "infer", str(spad_bundle), inputs[0], "--out", str(tmp_path / "none")])
    assert result.returncode == 1 and "models/model.pt: missing" in result.stderr
    install_tiny_weights(spad_bundle)
    for path in inputs:
        bundle_run(spad_bundle, ["configs/inference.json"], "--input_image", path, "--output_dir", str(tmp_path / "out"), *TINY_ARGS)
    rows = list(csv.DictReader((tmp_path / "out" / "embeddings.csv").open()))
    assert [row["input"] for row in rows] == inputs and {row["dimension"] for row in rows} == {"128"}
    vectors = [np.load(tmp_path / "out" / row["embedding"]) for row in rows]
    assert all(v.shape == (128,) and np.isfinite(v).all() for v in vectors)
    assert not np.allclose(vectors[0], vectors[1]) and not np.allclose(vectors[1], vectors[2])


def test_inference_feeds_the_network_the_scan_spacing(spad_bundle, tmp_path):
    """The head CT with every fourth slice kept (2 x 2 x 8 mm): aniso_d 2, so tokens hold 4 slices, not 16."""
    network = install_tiny_weights(spad_bundle, seed=3)
    source = nib.load(medfm.samples.path("ct_head"))
    thick = tmp_path / "ct_thick.nii.gz"
    affine = source.affine.copy()
    affine[:3, 2] *= 4
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj)[:, :, ::4], affine), thick)
    parser = ConfigParser()
    parser.read_config(str(spad_bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(spad_bundle)})
    image = parser.get_parsed_content("preprocessing")({"image": str(thick)})["image"].unsqueeze(0)
    spacing = medfm.transforms.voxel_spacing(image)
    assert float(spacing[2] / spacing[0]) == pytest.approx(4) and image.shape[-1] % 4 == 0
    bundle_run(spad_bundle, ["configs/inference.json"], "--input_image", str(thick), "--output_dir", str(tmp_path / "out"), *TINY_ARGS)
    saved = np.load(next((tmp_path / "out").glob("ct_thick-*_embedding.npy")))
    with torch.no_grad():
        expected = network.eval().embed(image.as_tensor(), aniso_d=2)[0].numpy()
        as_isotropic = network.embed(image.as_tensor(), aniso_d=3)[0].numpy()
    np.testing.assert_allclose(saved, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(saved, as_isotropic, atol=1e-3)


def _save_lightning_checkpoint(path, hyper_parameters) -> SpadViT:
    """The authors' release layout: Lightning keys, ``state_dict`` of the MIM ViT-B (3 channels) with
    ``module.`` where DDP left it, and the tokenizer removed."""
    torch.manual_seed(0)
    upstream = SpadViT(task="mim")
    state = {f"module.{k}": v for k, v in upstream.state_dict().items()}
    torch.save({"epoch": 9, "global_step": 300_000, "pytorch-lightning_version": "2.1.3", "state_dict": state,
                "optimizer_states": [], "lr_schedulers": [], "hyper_parameters": hyper_parameters}, path)
    return upstream


def test_import_of_the_upstream_release_layout_through_the_cli(spad_bundle, small_ct, tmp_path):
    checkpoint = tmp_path / "pumit-b.ckpt"
    upstream = _save_lightning_checkpoint(checkpoint, argparse.Namespace(lr=2e-5, mask_ratio=0.55))
    medfm_cli = [sys.executable, "-m", "medfm.cli", "weights"]
    refused = run_command(medfm_cli + ["import", str(spad_bundle), str(checkpoint)])
    assert refused.returncode == 1 and "Namespace" in refused.stderr and "--strip_objects" in refused.stderr
    result = run_command(medfm_cli + ["import", str(spad_bundle), str(checkpoint), "--strip_objects"])
    assert result.returncode == 0, result.stderr
    assert "registered weights 'pumit_b_v1'" in result.stdout and "missing keys: 0, unexpected keys: 0" in result.stdout
    imported = load_checkpoint(spad_bundle / "models" / "model.pt")
    assert "mask_token" not in imported and not any(k.startswith("mim_head") for k in imported)
    kernel = upstream.patch_embed.proj.weight.detach()
    assert imported["patch_embed.proj.weight"].shape == (768, 1, 16, 16, 16)
    torch.testing.assert_close(imported["patch_embed.proj.weight"], kernel.sum(1, keepdim=True))  # RGB summed
    record = json.loads((spad_bundle / "models" / "weights.json").read_text())
    assert record["weights"] == "pumit_b_v1" and record["source_sha256"] == sha256_of(checkpoint)
    assert run_command(medfm_cli + ["verify", str(spad_bundle)]).returncode == 0
    bundle_run(spad_bundle, ["configs/inference.json"], "--input_image", str(small_ct), "--output_dir", str(tmp_path / "out"))
    (row,) = csv.DictReader((tmp_path / "out" / "embeddings.csv").open())
    assert row["weights"] == "pumit_b_v1" and np.load(tmp_path / "out" / row["embedding"]).shape == (1536,)


def _fine_tune(bundle, table, output_dir, *overrides):
    return bundle_run(bundle, ["configs/train.json"], "--dataset_dir", str(table), "--output_dir", str(output_dir), *TINY_ARGS,
                      "--patch_size", "[64,64,1]", "--max_epochs", "1", "--num_workers", "0", "--val_fraction", "0.34",
                      "--batch_size", "2", *overrides)


@pytest.mark.training
def test_2d_classification_fine_tuning_evaluation_and_scratch(spad_bundle, slice_table, tmp_path):
    install_tiny_weights(spad_bundle)
    result = _fine_tune(spad_bundle, slice_table, tmp_path / "ft")
    log = result.stdout + result.stderr
    pretrained = len(SpadViT(**TINY).state_dict())
    total = len(SpadViT(task="classification", **TINY).state_dict())
    assert f"loaded {pretrained} of {total} tensors" in log and "val_auc" in log and "val_accuracy" in log
    bundle_run(spad_bundle, ["configs/train.json", "configs/evaluate.json"], "--dataset_dir", str(slice_table),
               "--output_dir", str(tmp_path / "ft"), *TINY_ARGS, "--patch_size", "[64,64,1]", "--val_fraction", "0.34")
    header, *rows = csv.reader((tmp_path / "ft" / "eval" / "predictions.csv").open())
    assert header[0] == "input" and len(header) == 3
    assert len(rows) == 2 and all(abs(float(a) + float(b) - 1) < 1e-5 for _, a, b in rows)
    scratch = _fine_tune(spad_bundle, slice_table, tmp_path / "scratch", "--pretrained", "False")
    assert "pretrained weights" not in scratch.stdout + scratch.stderr


@pytest.mark.training
def test_3d_segmentation_fine_tuning_on_anisotropic_voxels(spad_bundle, real_file, tmp_path):
    """The ITK head T1 and its real 7-class k-means segmentation, resampled to 1.5 x 1.5 x 3 mm
    (aniso_d 1: tokens of 8 slices)."""
    install_tiny_weights(spad_bundle)
    folder = tmp_path / "data"
    folder.mkdir()
    label = real_file("itk_t1_kmeans_segmentation")
    items = [{"image": medfm.samples.path("mr_head_t1"), "label": str(label)}] * 3
    labels = {str(i): f"k-means class {i}" for i in range(8)}
    (folder / "dataset.json").write_text(json.dumps({"name": "itk_t1", "labels": labels, "training": items}))
    result = bundle_run(spad_bundle, ["configs/train_segmentation.json"], "--dataset_dir", str(folder),
                        "--output_dir", str(tmp_path / "seg"), *TINY_ARGS, *TINY_DECODER, "--target_spacing", "[1.5,1.5,3.0]",
                        "--patch_size", "[64,64,16]", "--max_epochs", "1", "--val_interval", "1", "--num_workers", "0",
                        "--patches_per_volume", "1", "--volumes_per_batch", "2", "--val_fraction", "0.34",
                        "--train#handlers#0#min_fraction", "0.3")  # 2 tiny blocks are a third of the tensors beside the decoder
    log = result.stdout + result.stderr
    assert "loaded" in log and "val_mean_dice" in log
    state = load_checkpoint(tmp_path / "seg" / "models" / "model.pt")
    SpadViT(in_channels=1, task="segmentation", out_channels=8, decoder_channels=(8, 8, 16, 16, 32, 32), **TINY).load_state_dict(state)
    # its evaluation overlay: Dice per case and class by the labels' names, segmentations on the input's grid
    bundle_run(spad_bundle, ["configs/train_segmentation.json", "configs/evaluate_segmentation.json"], "--dataset_dir",
               str(folder), "--output_dir", str(tmp_path / "seg"), *TINY_ARGS, *TINY_DECODER, "--target_spacing",
               "[1.5,1.5,3.0]", "--patch_size", "[64,64,16]", "--num_workers", "0", "--val_fraction", "0.34")
    header = (tmp_path / "seg" / "eval" / "val_mean_dice_raw.csv").read_text().splitlines()[0]
    assert header == "filename," + ",".join(f"k-means class {i}" for i in range(1, 8)) + ",mean"
    segmentation = nib.load(next((tmp_path / "seg" / "eval").glob("*_seg.nii.gz")))
    assert segmentation.shape == nib.load(medfm.samples.path("mr_head_t1")).shape


@pytest.mark.training
def test_tokenizer_then_mim_pretraining_on_mixed_2d_and_3d_images(spad_bundle, mixed_datalist, tmp_path):
    common = ["--datalist", str(mixed_datalist), "--output_dir", str(tmp_path / "pt"), "--patch_size", "[32,32,32]",
              "--max_in_plane", "64", "--batch_size", "2", "--max_epochs", "2", *TINY_TOKENIZER]
    tokenizer = bundle_run(spad_bundle, ["configs/pretrain.json", "configs/pretrain_tokenizer.json"], *common)
    log = tokenizer.stdout + tokenizer.stderr
    assert "l1=" in log and "usage=" in log and "entropy=" in log
    # 6 images in 4 groups by (aniso_d, shape): three 32^3 crops, the mosaic's 3 slices, two 2D slices
    assert log.count("train_loss:") == 8
    tokenizer_state = load_checkpoint(tmp_path / "pt" / "models" / "tokenizer.pt")
    SpadTokenizer(channels=(8, 16, 32), codebook_size=64).load_state_dict(tokenizer_state)
    mim = bundle_run(spad_bundle, ["configs/pretrain.json"], *common, *TINY_ARGS)
    assert "masked_ce=" in mim.stdout + mim.stderr
    assert load_checkpoint(tmp_path / "pt" / "models" / "tokenizer.pt").keys() == tokenizer_state.keys()
    with open(tmp_path / "pt" / "mim_losses.csv") as stream:
        assert [row["epoch"] for row in csv.DictReader(stream)] == ["1", "2"]
    state = load_checkpoint(tmp_path / "pt" / "models" / "mim.pt")
    embedding = SpadViT(in_channels=1, **TINY)
    embedding.load_state_dict(checkpoint_filter_fn(state, embedding))  # MIM weights seed the bundle network


def test_tokenizer_and_mim_pretraining_on_two_processes_share_out_whole_batches_and_resume(spad_bundle, mixed_datalist, tmp_path):
    sources = {item["image"] for item in json.loads(mixed_datalist.read_text())}
    output = tmp_path / "pt"
    common = ["--datalist", str(mixed_datalist), "--patch_size", "[32,32,32]", "--max_in_plane", "64", "--batch_size", "2",
              *TINY_TOKENIZER]
    stages = {"tokenizer": (["configs/pretrain.json", "configs/pretrain_tokenizer.json"], []),
              "mim": (["configs/pretrain.json"], TINY_ARGS)}
    for run, (stage, (configs, extra)) in enumerate(stages.items()):
        log, seen = torchrun_pretraining(spad_bundle, configs, output, *common, *extra)
        # 4 batches of one (aniso_d, shape) group each: 2 per rank, every image once
        assert_pretraining_shared_out(seen, sources)
        assert len(seen[0]) + len(seen[1]) == len(sources)
        state_dir = f"training_state_stage_{stage}"
        assert_written_by_rank_zero(output, checkpoint=f"{stage}.pt", state_dir=state_dir, log=log, runs=2 * run + 1)
        log, _ = torchrun_pretraining(spad_bundle, configs, output, *common, *extra, epochs=2, resume=True)
        assert_resumed_on_both_ranks(output, log, state_dir, iterations_per_epoch=2)
        assert_written_by_rank_zero(output, epochs=2, checkpoint=f"{stage}.pt", state_dir=state_dir, log=log, runs=2 * run + 2)



def test_the_speed_benchmark_runs(tmp_path):
    """benchmarks/spad_vit.py end to end at batch 1 (its numbers are reported, never asserted)."""
    result = run_command([sys.executable, str(REPO / "benchmarks" / "spad_vit.py"), "--batch", "1", "--repeats", "1",
                          "--out", str(tmp_path)], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "forward_96.csv").open()))
    assert [row["model"] for row in rows] == ["spad_vit_b", "monai_vit_b"]
    assert all(float(row["median_forward_s"]) > 0 for row in rows)
    large = json.loads((tmp_path / "embed_512x512x100.json").read_text())
    assert large["network_input"] == "256x256x104" and large["tokens"] == 16 * 16 * 13
