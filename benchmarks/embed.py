"""Embedding cost: the full inference workflow, the embedding workflow, and the bare network (the floor).

    .venv/bin/python benchmarks/embed.py [--bundles models_genesis_chest_ct,vdt_resnet3d18,...]
        [--shape 256,256,96] [--cohort 20 --cohort_shape 96,96,48] [--skip_full] [--out DIR]

For one CT made from the embedded sample (resampled to ``--shape``, int16 HU NIfTI), per bundle
(bundles without installed weights get freshly initialised ones in a copy: timing does not depend
on the weights):

- ``medfm infer`` (``configs/inference.json``: for Models Genesis the whole U-Net, the restored
  volume inverted and written) and ``medfm embed`` (``configs/embed.json``: the encoder only),
  each a fresh process: wall time from start to exit and the peak resident memory of its largest
  process (``/usr/bin/time``);
- the bare network over the same windows in this process: the preprocessed volume through the
  bundle's embedding inferer, timed without reading, preprocessing or writing (the floor), with
  the achieved GFLOP/s (from the network's conv3d FLOPs per window) next to the conv3d peak of
  one 256->512-channel 3^3 convolution measured in the same run.

Then the throughput of ``medfm embed`` (first bundle) over ``--cohort`` scans of ``--cohort_shape`` with one
process and with two (``torchrun --nproc_per_node 2``, gloo). Nothing here is asserted; the
tables are printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmark_tables import write_resampled_ct, write_rows  # beside this script

REPO = Path(__file__).resolve().parents[1]


def timed_process(command: list[str]) -> dict:
    """Wall seconds and peak RSS (MiB, largest process) of a command run under GNU time."""
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    return {"seconds": round(seconds, 2), "peak_mib": round(peak_kib / 1024)}


def conv3d_flops(network: torch.nn.Module, window: torch.Tensor, run) -> int:
    """Multiply-adds x 2 of every Conv3d in one call of ``run(window)``."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        kernel = module.weight.shape[1] * module.weight[0, 0].numel()
        total += 2 * kernel * output.numel()

    hooks = [m.register_forward_hook(count) for m in network.modules() if isinstance(m, torch.nn.Conv3d)]
    with torch.inference_mode():
        run(window)
    for hook in hooks:
        hook.remove()
    return total


def conv3d_peak_gflops(repeats: int = 3) -> float:
    """GFLOP/s of one large 3^3 convolution (256 -> 512 channels on 16x16x8), the machine's conv3d ceiling here."""
    conv = torch.nn.Conv3d(256, 512, 3, padding=1).eval()
    x = torch.rand(4, 256, 16, 16, 8)
    flops = 2 * 256 * 27 * 4 * 512 * 16 * 16 * 8
    with torch.inference_mode():
        conv(x)
        started = time.perf_counter()
        for _ in range(repeats):
            conv(x)
    return flops * repeats / (time.perf_counter() - started) / 1e9


def bare_network(bundle: Path, ct: Path) -> dict:
    """The embedding inferer alone over the preprocessed volume (weights loaded, no I/O)."""
    from monai.bundle import ConfigParser

    from medfm.weights import load_checkpoint
    from medfm.workflows.cohort import sliding_window_of, window_count

    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / "inference.json"), str(bundle / "configs" / "embed.json")])
    parser["bundle_root"] = str(bundle)
    parser["device"] = "$torch.device('cpu')"
    network = parser.get_parsed_content("network").eval()
    network.load_state_dict(load_checkpoint(parser.get_parsed_content("ckpt_path")))
    inferer = parser.get_parsed_content("embedding_inferer")
    image = parser.get_parsed_content("preprocessing")({"image": str(ct)})["image"][None]
    with torch.inference_mode():
        started = time.perf_counter()
        inferer(image, network)
        seconds = time.perf_counter() - started
    window = sliding_window_of(inferer)
    if window is None:
        flops = conv3d_flops(network, image, lambda x: inferer(x, network))
    else:
        windows = window_count(image.shape[2:], window)
        patch = torch.rand(1, 1, *window.roi_size)
        flops = windows * conv3d_flops(network, patch, lambda x: inferer(x, network))
    return {"seconds": round(seconds, 2), "gflops": round(flops / seconds / 1e9, 1), "shape": tuple(image.shape[2:])}


def bundle_with_weights(name: str, folder: Path) -> tuple[Path, str]:
    """The bundle, or a copy holding freshly initialised weights where none are installed (timing only)."""
    import shutil

    from medfm.bundles import bundle_network

    bundle = REPO / "bundles" / name
    if (bundle / "models" / "model.pt").is_file():
        return bundle, "installed"
    copy = folder / name
    shutil.copytree(bundle / "configs", copy / "configs")
    (copy / "models").mkdir()
    torch.manual_seed(0)
    torch.save(bundle_network(copy).state_dict(), copy / "models" / "model.pt")
    return copy, "random (none installed; timing only)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", default="models_genesis_chest_ct", help="comma-separated bundle names")
    parser.add_argument("--shape", default="256,256,96")
    parser.add_argument("--cohort", type=int, default=20, help="scans for the throughput table (0: none)")
    parser.add_argument("--cohort_shape", default="96,96,48")
    parser.add_argument("--skip_full", action="store_true", help="leave out the full inference workflow (slow)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "embed"))
    args = parser.parse_args()
    shape = tuple(int(n) for n in args.shape.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    medfm = [sys.executable, "-m", "medfm"]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        ct = write_resampled_ct(folder / "ct.nii.gz", shape)
        peak = conv3d_peak_gflops()
        print(f"a {'x'.join(map(str, shape))} CT; conv3d peak measured now: {peak:.1f} GFLOP/s")
        for name in args.bundles.split(","):
            bundle, weights = bundle_with_weights(name, folder)
            row = {"bundle": name, "weights": weights}
            if not args.skip_full:
                full = timed_process(medfm + ["infer", str(bundle), str(ct), "--out", str(folder / f"infer_{name}")])
                row |= {"infer_seconds": full["seconds"], "infer_peak_mib": full["peak_mib"]}
            embed = timed_process(medfm + ["embed", str(bundle), str(ct), "--out", str(folder / f"embed_{name}"),
                                           "--progress", "False"])
            floor = bare_network(bundle, ct)
            row |= {"embed_seconds": embed["seconds"], "embed_peak_mib": embed["peak_mib"],
                    "network_input": "x".join(map(str, floor["shape"])), "bare_network_seconds": floor["seconds"],
                    "embed_over_bare": round(embed["seconds"] / floor["seconds"], 2),
                    "conv3d_gflops": floor["gflops"], "conv3d_share_of_peak": f"{100 * floor['gflops'] / peak:.0f}%"}
            rows.append(row)
            print(" | ".join(f"{key} {value}" for key, value in row.items()), flush=True)
        columns = list(dict.fromkeys(key for row in rows for key in row))
        print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
        for row in rows:
            print("| " + " | ".join(str(row.get(column, "")) for column in columns) + " |")
        write_rows([{column: row.get(column, "") for column in columns} for row in rows], out / "embed.csv")

        if args.cohort:
            cohort(medfm, folder, args, out)


def cohort(medfm: list[str], folder: Path, args, out: Path) -> None:
    """Throughput of the first bundle over ``--cohort`` scans with one process and with two."""
    name = args.bundles.split(",")[0]
    bundle, _ = bundle_with_weights(name, folder)
    cohort_shape = tuple(int(n) for n in args.cohort_shape.split(","))
    scans = [write_resampled_ct(folder / f"cohort_{i}.nii.gz", cohort_shape) for i in range(args.cohort)]
    throughput = []
    for processes in (1, 2):
        launcher = medfm if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 "--nproc_per_node", "2", "-m", "medfm"]
        measured = timed_process(launcher + ["embed", str(bundle), *map(str, scans), "--out",
                                             str(folder / f"cohort_{processes}"), "--progress", "False",
                                             "--num_workers", "1"])
        throughput.append({"processes": processes, **measured,
                           "scans_per_minute": round(60 * args.cohort / measured["seconds"], 1)})
    print(f"\n{name}, {args.cohort} scans of {'x'.join(map(str, cohort_shape))}:")
    print("| processes | seconds | scans per minute | peak MiB (largest process) |\n|---|---|---|---|")
    for row in throughput:
        print(f"| {row['processes']} | {row['seconds']} | {row['scans_per_minute']} | {row['peak_mib']} |")
    write_rows(throughput, out / f"embed_{name}_cohort.csv")


if __name__ == "__main__":
    main()
