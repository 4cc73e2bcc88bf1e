"""Cohort inference with task bundles: ``medfm infer TASK`` over a cohort against the bare network (the floor).

    .venv/bin/python benchmarks/cohort.py [--scans 20] [--shape 96,96,64] [--out DIR]

Two task bundles made here (their heads are freshly initialised: timing does not depend on the
weights): a Models Genesis segmentation bundle (``medfm label-bundle``: sliding windows of
64x64x32, the segmentation inverted onto each input's grid and written as NIfTI, with
``--statistics``) and a VDT ResNet-18 classification bundle (48^3 input, ``predictions.csv``).
The cohort is ``--scans`` crops of the embedded real head CT (int16 HU NIfTI, other offsets).

Per task:
- ``medfm infer TASK scans... --num_workers 1``: a fresh process, wall seconds from start to exit and the
  peak resident memory of its largest process (``/usr/bin/time``), with one process and with two
  (``torchrun --nproc_per_node 2``, gloo);
- the bare network in this process over the same scans: each scan read and preprocessed first (not
  timed), then only the bundle's inferer and network timed, summed over the cohort (the floor).

Nothing is asserted; the tables are printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmark_tables import write_rows  # beside this script
from embed import timed_process  # beside this script

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "medfm"]


def crops_of_the_sample_ct(folder: Path, count: int, shape: tuple[int, int, int]) -> list[Path]:
    """``count`` crops of the embedded head CT of ``shape`` voxels at different offsets (NIfTI, int16 HU)."""
    import nibabel as nib
    import numpy as np

    import medfm

    source = nib.load(medfm.samples.path("ct_head"))
    volume = np.asarray(source.dataobj)
    room = [max(0, full - size) for full, size in zip(volume.shape, shape)]
    scans = []
    for index in range(count):
        offset = [int(r * ((index * 0.37 + axis * 0.21) % 1)) for axis, r in enumerate(room)]
        window = tuple(slice(o, o + s) for o, s in zip(offset, shape))
        affine = source.affine.copy()
        affine[:3, 3] = source.affine[:3, :3] @ np.asarray(offset) + source.affine[:3, 3]
        path = folder / f"crop_{index:02d}.nii.gz"
        nib.save(nib.Nifti1Image(volume[window].astype(np.int16), affine), path)
        scans.append(path)
    return scans


def task_bundles(folder: Path) -> dict[str, Path]:
    """A segmentation and a classification task bundle with fresh heads."""
    from medfm.task_bundle import FineTuning, make_label_bundle, make_task_bundle

    segmentation = make_label_bundle("models_genesis_chest_ct", ["tissue"], folder / "genesis_tissue")
    torch.manual_seed(0)
    classification = make_task_bundle("vdt_resnet3d18", folder / "vdt_two_classes",
                                      FineTuning(task="classification", labels=["a", "b"]), pretrained=False)
    return {"segmentation": segmentation, "classification": classification}


def bare_network(task: Path, scans: list[Path]) -> float:
    """Seconds of the task bundle's inferer and network alone over the preprocessed scans (weights loaded, no I/O)."""
    import medfm

    runner = medfm.load(task, device="cpu")._runner("predict")
    images = [runner.preprocessing({"image": str(scan)})["image"] for scan in scans]
    runner.infer(images[0])  # the first call allocates
    started = time.perf_counter()
    for image in images:
        runner.infer(image)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, default=20)
    parser.add_argument("--shape", default="96,96,64", help="voxels of each crop")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cohort"))
    args = parser.parse_args()
    shape = tuple(int(n) for n in args.shape.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    medfm_cli = [sys.executable, "-m", "medfm"]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        scans = crops_of_the_sample_ct(folder, args.scans, shape)
        for task, bundle in task_bundles(folder).items():
            floor = bare_network(bundle, scans)
            extra = ["--statistics"] if task == "segmentation" else []
            for processes, launcher in ((1, medfm_cli), (2, TORCHRUN)):
                measured = timed_process(launcher + ["infer", str(bundle), *map(str, scans), "--out",
                                                     str(folder / f"{task}_{processes}"), "--progress", "False",
                                                     "--num_workers", "1", *extra])
                rows.append({"task": task, "processes": processes, "scans": args.scans, "seconds": measured["seconds"],
                             "bare_network_seconds": round(floor, 2), "over_bare": round(measured["seconds"] / floor, 2),
                             "scans_per_minute": round(60 * args.scans / measured["seconds"], 1),
                             "peak_mib": measured["peak_mib"]})
                print(" | ".join(f"{key} {value}" for key, value in rows[-1].items()), flush=True)
    print(f"\n{args.scans} crops of {'x'.join(map(str, shape))} voxels of the sample CT, torch threads {torch.get_num_threads()}:")
    print("| task | processes | seconds (end to end) | bare network seconds | end to end / bare | scans per minute | peak MiB (largest process) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['task']} | {row['processes']} | {row['seconds']} | {row['bare_network_seconds']} | {row['over_bare']} "
              f"| {row['scans_per_minute']} | {row['peak_mib']} |")
    write_rows(rows, out / "cohort.csv")


if __name__ == "__main__":
    main()
