"""Evidence run for the Universal Model / SAR pretext: do all three losses fall, and does the
modality discriminator move toward chance as the adversarial weight rises?

    .venv/bin/python benchmarks/sar_pretext.py [--weights 0 0.3 1] [--epochs 150] [--out DIR] [--reuse]

Runs ``bundles/universal_model_sar/configs/pretrain.json`` through ``python -m monai.bundle run``
once per adversarial (gradient-reversal) weight, on real CT and MRI that the package registries
provide (tests/testdata.py fetches them): the 2 mm head-CT crop in medfm.samples and the 1 mm
TotalSegmentator head-CT template (CT), the ITK head T1 in medfm.samples and Colin27 (MRI).
CPU-sized: 32x32x16 network input, crops of 16/32/64 voxels (x1.5 mm in-plane), 2 crops of each
of the 4 volumes in every step (one epoch = one step of 8 crops, both modalities in every batch). Writes each run's per-epoch loss CSV, a summary
CSV (epoch 1 and the mean of each third of the run) and a plot (with matplotlib) into ``--out``;
prints the summary table. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

from benchmark_tables import write_rows  # beside this script

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "universal_model_sar"
sys.path.insert(0, str(REPO))

COLUMNS = ("restoration", "scale", "domain", "scale_accuracy", "domain_accuracy")


def datalist(folder: Path) -> Path:
    """The four real volumes, fetched (and sha256-checked) by tests/testdata.py where needed."""
    import medfm
    from tests import testdata

    problems = testdata.fetch()
    if problems:
        raise SystemExit("test data: " + "; ".join(problems))
    items = [
        {"image": medfm.samples.path("ct_head"), "modality": "CT"},
        {"image": str(testdata.FILES["ct_brain_template_1mm"].path), "modality": "CT"},
        {"image": medfm.samples.path("mr_head_t1"), "modality": "MR"},
        {"image": str(testdata.FILES["colin27_t1"].path), "modality": "MR"},
    ]
    path = folder / "datalist.json"
    path.write_text(json.dumps(items, indent=2))
    return path


def read_losses(path: Path) -> list[dict]:
    with open(path, newline="") as stream:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(stream)]


def run(weight: float, epochs: int, datalist_file: Path, out: Path, seed: int, reuse: bool) -> list[dict]:
    run_dir = out / f"adversarial_{weight:g}"
    losses = run_dir / "pretext_losses.csv"
    if reuse and losses.is_file() and len(read_losses(losses)) == epochs:
        return read_losses(losses)
    losses.unlink(missing_ok=True)
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/pretrain.json",
               "--meta_file", "configs/metadata.json", "--bundle_root", str(BUNDLE), "--output_dir", str(run_dir),
               "--datalist", str(datalist_file), "--adversarial_weight", str(weight), "--max_epochs", str(epochs),
               "--patch_size", "[32,32,16]", "--crop_sizes", "[[16,16,8],[32,32,16],[64,64,32]]",
               "--crops_per_volume", "2", "--volumes_per_batch", "4", "--checkpoint_interval", str(epochs), "--seed", str(seed)]
    result = subprocess.run(command, cwd=BUNDLE, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return read_losses(losses)


def third_means(rows: list[dict], column: str) -> list[float]:
    """Means over the first, middle and last third of the epochs (the adversarial game oscillates,
    so short windows mislead)."""
    size = len(rows) // 3
    parts = [rows[:size], rows[size:2 * size], rows[2 * size:]]
    return [sum(r[column] for r in part) / len(part) for part in parts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.3, 1.0])
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="summarise finished runs in --out instead of rerunning them")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sar_pretext")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    listing = datalist(args.out)
    summary = []
    for weight in args.weights:
        rows = run(weight, args.epochs, listing, args.out, args.seed, args.reuse)
        for column in COLUMNS:
            first, middle, last = third_means(rows, column)
            summary.append({"adversarial_weight": weight, "quantity": column, "epoch_1": rows[0][column],
                            "first_third": first, "middle_third": middle, "last_third": last})
    write_rows(summary, args.out / "summary.csv")
    print(f"epoch 1 and means per third of {args.epochs} epochs (one 8-crop step each):")
    print(f"{'adversarial weight':>18} {'quantity':>16} {'epoch 1':>8} {'1st':>8} {'2nd':>8} {'3rd':>8}")
    for row in summary:
        print(f"{row['adversarial_weight']:>18g} {row['quantity']:>16} {row['epoch_1']:>8.4f} {row['first_third']:>8.4f} "
              f"{row['middle_third']:>8.4f} {row['last_third']:>8.4f}")
    plot(args.out, args.weights)


def plot(out: Path, weights: list[float]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    figure, axes = plt.subplots(1, len(COLUMNS), figsize=(4 * len(COLUMNS), 3.2))
    for weight in weights:
        rows = read_losses(out / f"adversarial_{weight:g}" / "pretext_losses.csv")
        for axis, column in zip(axes, COLUMNS):
            axis.plot([r["epoch"] for r in rows], [r[column] for r in rows], label=f"adversarial {weight:g}", lw=0.8)
            axis.set_title(column)
            axis.set_xlabel("epoch")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(out / "sar_pretext.png", dpi=110)


if __name__ == "__main__":
    main()
