"""Mixed precision for embeddings on CUDA: how far ``medfm embed --amp True`` (bfloat16 autocast) moves each
bundle's embedding from fp32, and what it saves in time.

    .venv/bin/python benchmarks/embed_amp.py [--bundles models_genesis_chest_ct,...] [--out DIR]

Per bundle, the embedded sample its model reads (the head CT; the T1 MRI for the Medical Transformer) goes
through ``medfm.embed`` twice in this process, fp32 then ``amp=True``, each after a warm-up run. The table gives
both times, the cosine similarity of the two embeddings and their largest difference relative to the fp32
embedding's largest magnitude. Bundles without installed weights get freshly initialised ones in a copy (the
tolerance of random weights is only indicative). Needs a CUDA device: on the CPU, where ``--amp`` is refused,
it says so and exits 2. Nothing is asserted; the table is printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmark_tables import write_rows  # beside this script
from embed import REPO, bundle_with_weights

ALL_BUNDLES = "models_genesis_chest_ct,universal_model_sar,vdt_resnet3d18,medical_transformer_brain_mri,spad_vit_base"


def embedding(bundle: Path, scan: str, out: Path, amp: bool) -> tuple[np.ndarray, float]:
    import medfm

    medfm.embed(bundle, [scan], out=out / "warm-up", amp=amp, progress=False, num_workers=0)
    torch.cuda.synchronize()
    started = time.perf_counter()
    summary = medfm.embed(bundle, [scan], out=out / "timed", amp=amp, progress=False, num_workers=0)
    torch.cuda.synchronize()
    return np.load(out / "timed" / summary.rows[0]["embedding"]), time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", default=ALL_BUNDLES, help="comma-separated bundle names")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "embed_amp", help="folder for embed_amp.csv")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("embed_amp.py: needs a CUDA device (medfm refuses --amp on the CPU); nothing measured", file=sys.stderr)
        return 2
    import medfm

    rows = []
    with tempfile.TemporaryDirectory(prefix="medfm-amp-") as scratch:
        for name in args.bundles.split(","):
            bundle, weights = bundle_with_weights(name, Path(scratch))
            scan = medfm.samples.path("mr_head_t1" if name == "medical_transformer_brain_mri" else "ct_head")
            fp32, fp32_seconds = embedding(bundle, scan, Path(scratch) / name / "fp32", amp=False)
            bf16, bf16_seconds = embedding(bundle, scan, Path(scratch) / name / "amp", amp=True)
            cosine = float(fp32 @ bf16 / (np.linalg.norm(fp32) * np.linalg.norm(bf16)))
            rows.append({"bundle": name, "weights": weights, "device": torch.cuda.get_device_name(),
                         "fp32_seconds": round(fp32_seconds, 3), "amp_seconds": round(bf16_seconds, 3),
                         "cosine": f"{cosine:.6f}",
                         "max_difference_relative": f"{np.abs(fp32 - bf16).max() / np.abs(fp32).max():.2e}"})
            print(" | ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_rows(rows, args.out / "embed_amp.csv")
    print("\n| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
