"""The distributed-training guard: every training config and stage of every bundle, with its DDP overlay, run by
``torchrun --nproc_per_node 2`` on the CPU (gloo) for at least three iterations per rank.

For each run:
- it succeeds, each rank having run at least three iterations (DDP fails at the second iteration when a
  trainable parameter gets no gradient; medfm's trainer already refuses it on the first, naming them);
- the two ranks end with bitwise identical parameters (buffers are not compared: BatchNorm running statistics
  follow each rank's own last batch until DDP broadcasts rank 0's at the next forward; rank 0 saves them);
- the two ranks' augmentation draws differ: a test-only overlay gives both ranks the same items in the same
  order, so only their random streams (crops, flips, corruptions, masks) can make their batches differ;
- a second run with the same seed and world size draws the same and ends with the same parameters.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import medfm
from medfm.networks import MedicalTransformer, SpadTokenizer, vdt_resnet18
from medfm.weights import import_weights
from tests.bundles.test_medical_transformer_brain_mri import SMALL_GRID, brain_t1s, labelled_table  # noqa: F401
from tests.bundles.test_spad_vit_base import (TINY_ARGS, TINY_DECODER, TINY_TOKENIZER, install_tiny_weights,  # noqa: F401
                                              mixed_datalist, slice_table)
from tests.bundles.test_universal_model_sar import SMALL_PRETRAINING
from tests.bundles.test_vdt_resnet3d18 import crop_classification_dataset, image_folder  # noqa: F401
from tests.conftest import (BUNDLES, REPO, TORCHRUN, assert_written_by_rank_zero, bundle_run, crop_nifti,
                            save_upstream_checkpoint)

pytestmark = pytest.mark.slow

#: every config that trains, per bundle: the pre-training stages take multi_gpu_pretrain.json, the fine-tunings
#: multi_gpu_train.json
TRAINING_CONFIGS = ("pretrain.json", "pretrain_tokenizer.json", "train.json", "train_segmentation.json")


@dataclass
class Case:
    bundle: str
    configs: list[str]
    #: the arguments of the run; may write its data and weights (into the tmp folder or the bundle copy)
    arguments: Callable[[pytest.FixtureRequest, Path, Path], list[str]]
    #: the config id of the training sampler that the guard points at the same items on both ranks
    sampler: str = "train#sampler"
    #: epochs to run: two where two validation cases (one per rank) leave two training cases
    epochs: int = 1

    @property
    def fine_tuning(self) -> bool:
        return self.configs[0].startswith("configs/train")

    @property
    def overlay(self) -> str:
        return "configs/multi_gpu_train.json" if self.fine_tuning else "configs/multi_gpu_pretrain.json"


def ct_crops(folder: Path, prefixes: dict[str, str], count: int) -> Path:
    """``count`` crops of each embedded sample named ``{prefix}_{index}.nii.gz`` (the pre-training globs)."""
    folder.mkdir()
    for prefix, sample in prefixes.items():
        for index in range(count):
            crop_nifti(medfm.samples.path(sample), folder / f"{prefix}_{index}.nii.gz", (48, 48, 32), (8 * index, 8, 8))
    return folder


def genesis_pretrain(request, tmp_path, bundle):
    data = ct_crops(tmp_path / "scans", {"ct": "ct_head"}, 3)
    return ["--data_dir", str(data), "--patch_size", "[32,32,16]", "--crops_per_volume", "2", "--num_workers", "0"]


def segmentation_fine_tuning(*extra):
    def arguments(request, tmp_path, bundle):
        return ["--dataset_dir", str(request.getfixturevalue("tiny_segmentation_dataset")), "--patch_size", "[32,32,16]",
                "--patches_per_volume", "2", "--volumes_per_batch", "1", "--val_interval", "1", "--num_workers", "0",
                "--val_fraction", "0.5", *extra]
    return arguments


def sar_pretrain(request, tmp_path, bundle):
    data = ct_crops(tmp_path / "scans", {"ct": "ct_head", "mr": "mr_head_t1"}, 2)
    return ["--data_dir", str(data), "--volumes_per_batch", "1", *SMALL_PRETRAINING]


def sar_fine_tuning(request, tmp_path, bundle):
    save_upstream_checkpoint(tmp_path / "upstream_style.pt", seed=3)
    import_weights(bundle, tmp_path / "upstream_style.pt")
    return segmentation_fine_tuning("--num_classes", "2", "--modality", "CT")(request, tmp_path, bundle)


def vdt_pretrain(request, tmp_path, bundle):
    # 12 images, 2 held out: 10 in batches of 3 (the last one dropped)
    return ["--data_dir", str(request.getfixturevalue("image_folder")), "--patch_size", "[32,32]", "--batch_size", "3",
            "--num_workers", "0", "--val_fraction", "0.17"]


def vdt_classification(request, tmp_path, bundle):
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(vdt_resnet18(num_classes=1000).state_dict(), bundle / "models" / "model.pt")
    return ["--dataset_dir", str(request.getfixturevalue("crop_classification_dataset")), "--patch_size", "[32,32,32]",
            "--num_workers", "0", "--val_fraction", "0.25", "--batch_size", "2"]


def vdt_segmentation(request, tmp_path, bundle):
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(vdt_resnet18(feed_forward=False).state_dict(), bundle / "models" / "model.pt")
    return segmentation_fine_tuning("--modality", "CT", "--patch_size", "[32,32,32]")(request, tmp_path, bundle)


def mt_pretrain(stage):
    def arguments(request, tmp_path, bundle):
        datalist = tmp_path / "datalist.json"
        datalist.write_text(json.dumps(request.getfixturevalue("brain_t1s")))
        extra = []
        if stage == 2:  # stage 2 starts from stage 1's encoder
            torch.manual_seed(0)
            torch.save(MedicalTransformer().state_dict(), tmp_path / "stage1.pt")
            extra = ["--stage1_checkpoint", str(tmp_path / "stage1.pt")]
        return ["--datalist", str(datalist), *SMALL_GRID, "--volumes_per_batch", "2", "--stage", str(stage), *extra]
    return arguments


def mt_fine_tuning(request, tmp_path, bundle):
    return ["--dataset_dir", str(request.getfixturevalue("labelled_table")), *SMALL_GRID, "--num_workers", "0",
            "--val_fraction", "0.34", "--batch_size", "1"]


def spad_pretrain(stage):
    def arguments(request, tmp_path, bundle):
        common = ["--datalist", str(request.getfixturevalue("mixed_datalist")), "--patch_size", "[32,32,32]",
                  "--max_in_plane", "64", "--batch_size", "2", *TINY_TOKENIZER]
        if stage == "tokenizer":
            return common
        torch.manual_seed(0)
        torch.save(SpadTokenizer(channels=(8, 16, 32), codebook_size=64).state_dict(), tmp_path / "tokenizer.pt")
        return [*common, *TINY_ARGS, "--tokenizer_path", str(tmp_path / "tokenizer.pt")]
    return arguments


def spad_classification(request, tmp_path, bundle):
    install_tiny_weights(bundle)
    return ["--dataset_dir", str(request.getfixturevalue("slice_table")), *TINY_ARGS, "--patch_size", "[64,64,1]",
            "--num_workers", "0", "--val_fraction", "0.34", "--batch_size", "1"]


def spad_segmentation(request, tmp_path, bundle):
    install_tiny_weights(bundle)
    folder = tmp_path / "data"
    folder.mkdir()
    items = [{"image": medfm.samples.path("mr_head_t1"), "label": str(request.getfixturevalue("real_file")("itk_t1_kmeans_segmentation"))}] * 4
    labels = {str(i): f"k-means class {i}" for i in range(8)}
    (folder / "dataset.json").write_text(json.dumps({"name": "itk_t1", "labels": labels, "training": items}))
    return ["--dataset_dir", str(folder), *TINY_ARGS, *TINY_DECODER, "--target_spacing", "[1.5,1.5,3.0]",
            "--patch_size", "[64,64,16]", "--val_interval", "1", "--num_workers", "0", "--patches_per_volume", "1",
            "--volumes_per_batch", "1", "--val_fraction", "0.5",
            "--train#handlers#0#min_fraction", "0.3"]  # 2 tiny blocks are a third of the tensors beside the decoder


CASES = {
    "models_genesis_chest_ct/pretrain": Case("models_genesis_chest_ct", ["configs/pretrain.json"], genesis_pretrain),
    "models_genesis_chest_ct/train": Case("models_genesis_chest_ct", ["configs/train.json"], segmentation_fine_tuning(),
                                          epochs=2),
    "universal_model_sar/pretrain": Case("universal_model_sar", ["configs/pretrain.json"], sar_pretrain),
    "universal_model_sar/train": Case("universal_model_sar", ["configs/train.json"], sar_fine_tuning, epochs=2),
    "vdt_resnet3d18/pretrain": Case("vdt_resnet3d18", ["configs/pretrain.json"], vdt_pretrain),
    "vdt_resnet3d18/train": Case("vdt_resnet3d18", ["configs/train.json"], vdt_classification),
    "vdt_resnet3d18/train_segmentation": Case("vdt_resnet3d18", ["configs/train_segmentation.json"], vdt_segmentation,
                                              epochs=2),
    "medical_transformer_brain_mri/pretrain-stage1": Case("medical_transformer_brain_mri", ["configs/pretrain.json"],
                                                          mt_pretrain(1)),
    "medical_transformer_brain_mri/pretrain-stage2": Case("medical_transformer_brain_mri", ["configs/pretrain.json"],
                                                          mt_pretrain(2)),
    "medical_transformer_brain_mri/train": Case("medical_transformer_brain_mri", ["configs/train.json"], mt_fine_tuning),
    "spad_vit_base/pretrain_tokenizer": Case("spad_vit_base", ["configs/pretrain.json", "configs/pretrain_tokenizer.json"],
                                             spad_pretrain("tokenizer"), sampler="train#batch_sampler"),
    "spad_vit_base/pretrain-mim": Case("spad_vit_base", ["configs/pretrain.json"], spad_pretrain("mim"),
                                       sampler="train#batch_sampler"),
    "spad_vit_base/train": Case("spad_vit_base", ["configs/train.json"], spad_classification),
    "spad_vit_base/train_segmentation": Case("spad_vit_base", ["configs/train_segmentation.json"], spad_segmentation,
                                             epochs=2),
}


def test_the_guard_covers_every_training_config_and_stage():
    on_disk = {(bundle.name, config.name) for bundle in BUNDLES.iterdir() for config in (bundle / "configs").glob("*.json")
               if config.name in TRAINING_CONFIGS}
    guarded = {(case.bundle, Path(case.configs[-1]).name) for case in CASES.values()}
    assert guarded == on_disk
    assert len({p.name for p in BUNDLES.iterdir() if (p / "configs" / "metadata.json").is_file()}) == 5
    # the two-stage pre-trainings: each stage has its own case
    stages = [name for name in CASES if name.startswith(("medical_transformer_brain_mri/pretrain", "spad_vit_base/pretrain"))]
    assert len(stages) == 4


def run_guarded(case: Case, bundle: Path, arguments: list[str], output: Path) -> tuple[str, list[dict]]:
    """One torchrun run of the case with the guard's overlay; returns the log and each rank's record."""
    overlay = output.parent / f"{output.name}_guard.json"
    overlay.write_text(json.dumps({
        "+train#handlers": [{"_target_": "tests.ddp_guard.GuardRecorder", "output_dir": "@output_dir"}],
        f"{case.sampler}#num_replicas": 1, f"{case.sampler}#rank": 0,
    }))
    result = bundle_run(bundle, [*case.configs, case.overlay, str(overlay)], "--output_dir", str(output),
                        "--max_epochs", str(case.epochs), *arguments, launcher=TORCHRUN, env={"PYTHONPATH": str(REPO)})
    records = [json.loads((output / f"guard_rank{rank}.json").read_text()) for rank in (0, 1)]
    return result.stdout + result.stderr, records


@pytest.mark.parametrize("name", sorted(CASES))
def test_distributed_training_is_correct(name, request, tmp_path):
    case = CASES[name]
    bundle = tmp_path / case.bundle
    shutil.copytree(BUNDLES / case.bundle, bundle, ignore=shutil.ignore_patterns("eval", "finetune*", "pretrain"))
    arguments = case.arguments(request, tmp_path, bundle)
    log, first = run_guarded(case, bundle, arguments, tmp_path / "run1")
    for rank, record in enumerate(first):
        assert record["iterations"] >= 3, f"rank {rank} ran {record['iterations']} iterations"
    assert first[0]["parameters"] == first[1]["parameters"], "the ranks ended with different parameters"
    assert first[0]["draws"] != first[1]["draws"], "the ranks drew the same augmentations"
    if case.fine_tuning:
        assert log.count("pretrained weights ") == 2, "each rank loads the pretrained weights"
        assert_written_by_rank_zero(tmp_path / "run1", epochs=case.epochs)
    _, second = run_guarded(case, bundle, arguments, tmp_path / "run2")
    assert second == first, "a second run with the same seed and world size differs"
