"""Evidence run for VDT supervised 3D pre-training: pre-train on 2D images, then fine-tune a 3D
task from pretrained weights and from scratch, and report both curves.

    .venv/bin/pip install scikit-learn      # the 2D images come from its bundled digits set
    .venv/bin/python benchmarks/vdt_transfer.py [--pretrain_epochs 15] [--finetune_epochs 20] [--out DIR]

Stage 1 runs ``bundles/vdt_resnet3d18/configs/pretrain.json`` on an ImageFolder tree written from
scikit-learn's digits (1,797 real 8x8 handwritten digits, 10 classes, upsampled to 32x32): every
image becomes a 3-slice volume through the variable dimension transform, strides (1, 2, 2).
Stage 2 runs ``configs/train.json`` twice with the same seed, from the stage-1 weights and from
scratch, on a 3D task built from the four real head volumes the package registries provide
(two CTs, two T1 MRIs; tests/testdata.py fetches them): 48^3 crops labelled by whether the
crop centre lies in the upper or the lower half of the head (so the bundle's flip along the
inferior-superior axis is switched off for this task). Per-epoch CSVs and a summary are written
to ``--out``; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Events

from benchmark_tables import write_rows  # beside this script

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "vdt_resnet3d18"
sys.path.insert(0, str(REPO))

#: index of the RandFlipd along the last (inferior-superior) axis in train.json's preprocessing
SUPERIOR_FLIP = "train#preprocessing#transforms#9#prob"


def write_digits_image_folder(root: Path) -> Path:
    """scikit-learn's digits as PNGs in one folder per class, 0-16 scaled to 0-255, 32x32."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = Image.fromarray((image * 255 / 16).astype(np.uint8))
        pixels.resize((32, 32), Image.BILINEAR).save(folder / f"{index:04d}.png")
    return root


def head_volumes() -> list[tuple[str, str]]:
    import medfm
    from tests import testdata

    problems = testdata.fetch()
    if problems:
        raise SystemExit("test data: " + "; ".join(problems))
    return [(medfm.samples.path("ct_head"), "CT"), (str(testdata.FILES["ct_brain_template_1mm"].path), "CT"),
            (medfm.samples.path("mr_head_t1"), "MR"), (str(testdata.FILES["colin27_t1"].path), "MR")]


def write_upper_lower_dataset(root: Path, crops_per_half: int = 8, size: int = 48, seed: int = 0) -> Path:
    """48^3 crops of each head volume (RAS-reoriented), half from the upper and half from the lower
    half of the head's bounding box; the last quarter of the list (4 per volume) is validation."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    train, validation = [], []
    for volume_index, (path, modality) in enumerate(head_volumes()):
        image = nib.as_closest_canonical(nib.load(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
        background = data[0, 0, 0]
        inside = np.argwhere(np.abs(data - background) > 0.05 * (data.max() - data.min()))
        low, high = inside.min(0), inside.max(0)
        middle = (low[2] + high[2]) // 2
        items = []
        for label, (z_low, z_high) in enumerate(((middle, high[2]), (low[2], middle))):  # 0: upper, 1: lower
            for index in range(crops_per_half):
                centre = [rng.integers(low[a], high[a] + 1) for a in (0, 1)] + [rng.integers(z_low, z_high + 1)]
                start = [int(np.clip(c - size // 2, 0, s - size)) for c, s in zip(centre, data.shape)]
                window = tuple(slice(s, s + size) for s in start)
                affine = image.affine.copy()
                affine[:3, 3] = image.affine[:3, :3] @ np.asarray(start) + image.affine[:3, 3]
                name = f"head{volume_index}_{'upper' if label == 0 else 'lower'}_{index}.nii.gz"
                nib.save(nib.Nifti1Image(data[window], affine), root / name)
                items.append({"image": name, "label": label, "modality": modality})
        order = rng.permutation(len(items))
        held_out = set(order[: len(items) // 4])
        validation += [items[i] for i in sorted(held_out)]
        train += [items[i] for i in range(len(items)) if i not in held_out]
    dataset = {"name": "head_upper_vs_lower", "labels": {"0": "upper half", "1": "lower half"},
               "training": train + validation}
    (root / "dataset.json").write_text(json.dumps(dataset, indent=1))
    return root


def run_recorded(config: list[str], overrides: dict, validator_id: str = "validate#evaluator") -> list[dict]:
    """Run a bundle training config in-process; one row per epoch: mean training loss + validation metrics."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=[str(BUNDLE / "configs" / c) for c in config],
                              meta_file=str(BUNDLE / "configs" / "metadata.json"),
                              logging_file=str(BUNDLE / "configs" / "logging.conf"), workflow_type="train",
                              bundle_root=str(BUNDLE), **overrides)
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    validator = workflow.parser.get_parsed_content(validator_id)
    rows, losses = [], []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: losses.append(float(engine.state.output[0]["loss"])))

    def record(engine) -> None:
        rows.append({"epoch": engine.state.epoch, "train_loss": float(np.mean(losses)),
                     **{k: float(v) for k, v in validator.state.metrics.items()}})
        losses.clear()
        print(json.dumps(rows[-1]), flush=True)

    trainer.add_event_handler(Events.EPOCH_COMPLETED, record)
    workflow.run()
    workflow.finalize()
    return rows


def thirds(rows: list[dict], key: str) -> list[float]:
    parts = np.array_split(np.asarray([r[key] for r in rows]), 3)
    return [float(part.mean()) for part in parts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain_epochs", type=int, default=15)
    parser.add_argument("--finetune_epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "vdt_transfer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    images = write_digits_image_folder(args.out / "digits")
    pretraining = run_recorded(["pretrain.json"], {
        "data_dir": str(images), "output_dir": str(args.out / "pretrain"), "patch_size": [32, 32],
        "min_crop_side": 0.7, "batch_size": 64, "num_workers": 0, "max_epochs": args.pretrain_epochs,
        "learning_rate": 0.05, "val_fraction": 0.2, "seed": args.seed})
    write_rows(pretraining, args.out / "pretrain_digits.csv")

    dataset = write_upper_lower_dataset(args.out / "upper_lower", seed=args.seed)
    curves = {}
    for start in ("pretrained", "scratch"):
        curves[start] = run_recorded(["train.json"], {
            "dataset_dir": str(dataset), "output_dir": str(args.out / f"finetune_{start}"),
            "pretrained": start == "pretrained", "pretrained_path": str(args.out / "pretrain" / "models" / "model.pt"),
            "batch_size": 8, "num_workers": 0, "max_epochs": args.finetune_epochs, "val_fraction": 0.25,
            "seed": args.seed, SUPERIOR_FLIP: 0.0})
        write_rows(curves[start], args.out / f"finetune_{start}.csv")

    summary = [{"run": "pretrain (digits, 10 classes)", "metric": "val_accuracy",
                "epoch_1": pretraining[0]["val_accuracy"], "thirds": thirds(pretraining, "val_accuracy")}]
    for start, rows in curves.items():
        for metric in ("train_loss", "val_auc", "val_accuracy"):
            summary.append({"run": f"fine-tune from {start}", "metric": metric, "epoch_1": rows[0][metric],
                            "thirds": thirds(rows, metric)})
    with open(args.out / "summary.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["run", "metric", "epoch_1", "first_third", "middle_third", "last_third"])
        for row in summary:
            writer.writerow([row["run"], row["metric"], f"{row['epoch_1']:.3f}", *(f"{v:.3f}" for v in row["thirds"])])
    print((args.out / "summary.csv").read_text())


if __name__ == "__main__":
    main()
