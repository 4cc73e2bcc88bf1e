"""SPAD-ViT-B speed and memory: one 96^3 patch against MONAI's ViT of the same size, and a
512x512x100 CT embedded end to end through the bundle's inference workflow.

    .venv/bin/python benchmarks/spad_vit.py [--batch 2] [--repeats 5] [--device cpu|cuda] [--out DIR]

Part 1 builds ``medfm.networks.SpadViT`` (ViT-B: width 768, 12 blocks, 12 heads, SwiGLU 2048, 3D
RoPE) and ``monai.networks.nets.ViT`` (width 768, 12 layers, 12 heads, MLP 3072, learned
positions, patch 16) for one input channel, and times ``repeats`` forward passes in inference
mode on ``batch`` random 96^3 patches after one warm-up. Peak memory is the process's peak
resident set growth on CPU (each model in its own fresh process) or
``torch.cuda.max_memory_allocated`` on a GPU. The target is SPAD-ViT at most 1.1x MONAI's time.

Part 2 writes a 512x512x100 CT (the embedded real head CT resampled to 0.5 x 0.5 x 2 mm, int16 HU)
and runs ``python -m monai.bundle run`` with ``configs/inference.json`` on it (ViT-B at random
initialisation: the timing does not depend on the weights), reporting the wall time of the whole
process (load, percentile scaling, spacing-aware resampling to at most 256 in-plane, network,
saving) and the token grid. Nothing here is asserted; a table is printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmark_tables import write_resampled_ct, write_rows  # beside this script

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "spad_vit_base"


def build(name: str) -> torch.nn.Module:
    if name == "spad_vit_b":
        from medfm.networks import SpadViT

        return SpadViT(in_channels=1)
    from monai.networks.nets import ViT

    return ViT(in_channels=1, img_size=96, patch_size=16, hidden_size=768, mlp_dim=3072, num_layers=12, num_heads=12,
               proj_type="conv", pos_embed_type="learnable", classification=False, spatial_dims=3)


def measure_one(name: str, batch: int, repeats: int, device: str) -> dict:
    """Time and peak memory of one model, in this (fresh) process."""
    torch.manual_seed(0)
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build(name).to(device).eval()
    x = torch.rand(batch, 1, 96, 96, 96, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        model(x)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak_mib = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
                else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kib) / 1024)
    return {"model": name, "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "batch": batch, "median_forward_s": round(sorted(times)[len(times) // 2], 4), "peak_memory_mib": round(peak_mib, 1)}


def embed_large_ct(folder: Path) -> dict:
    from medfm.networks import SpadViT

    ct = write_resampled_ct(folder / "ct_512x512x100.nii.gz", (512, 512, 100))
    bundle = folder / "bundle"
    subprocess.run(["cp", "-r", str(BUNDLE), str(bundle)], check=True)
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(SpadViT(in_channels=1).state_dict(), bundle / "models" / "model.pt")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                             "--meta_file", "configs/metadata.json", "--bundle_root", str(bundle), "--input_image", str(ct),
                             "--output_dir", str(folder / "out")], cwd=bundle, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle)})
    image = parser.get_parsed_content("preprocessing")({"image": str(ct)})["image"]
    from medfm.transforms import image_aniso_d

    aniso_d = image_aniso_d(image)
    grid = (image.shape[1] // 16, image.shape[2] // 16, image.shape[3] // max(16 >> aniso_d, 1))
    return {"input": "512x512x100 CT (int16 NIfTI)", "network_input": "x".join(map(str, image.shape[1:])),
            "aniso_d": aniso_d, "tokens": grid[0] * grid[1] * grid[2], "end_to_end_s": round(elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "spad_vit")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one model in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, args.batch, args.repeats, args.device)))
        return
    rows = []
    for name in ("spad_vit_b", "monai_vit_b"):
        result = subprocess.run([sys.executable, __file__, "--one", name, "--batch", str(args.batch), "--repeats",
                                 str(args.repeats), "--device", args.device], capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    ratio = rows[0]["median_forward_s"] / rows[1]["median_forward_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    write_rows(rows, args.out / "forward_96.csv")
    print(f"device: {args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"{'model':<14}{'params (M)':>11}{'batch':>7}{'forward (s)':>13}{'peak mem (MiB)':>16}")
    for row in rows:
        print(f"{row['model']:<14}{row['parameters_m']:>11}{row['batch']:>7}{row['median_forward_s']:>13}{row['peak_memory_mib']:>16}")
    print(f"SPAD-ViT-B / MONAI ViT-B forward time: {ratio:.2f}x (target <= 1.1x)")
    with tempfile.TemporaryDirectory(prefix="medfm-spad-bench-") as scratch:
        large = embed_large_ct(Path(scratch))
    (args.out / "embed_512x512x100.json").write_text(json.dumps(large, indent=2) + "\n")
    print(f"embed {large['input']}: network input {large['network_input']}, aniso_d {large['aniso_d']}, "
          f"{large['tokens']} tokens, {large['end_to_end_s']} s end to end")


if __name__ == "__main__":
    main()
