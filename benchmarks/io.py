"""Load time and peak memory of a 512x512x300 DICOM series: medfm's LoadScan vs ITK's series reader.

    .venv/bin/python benchmarks/io.py [--slices 300] [--repeats 3] [--workdir DIR]

The series is written once from the embedded real head CT, resampled to 512x512x300 (int16 HU,
one file per slice). Each measurement runs in a fresh Python process, so its peak resident memory
(VmHWM) is its own. Both sides end with the voxels in a numpy-backed array: ITK's series reader
plus ``itk.array_from_image``, and medfm's ``LoadScan``, which reads every header once with pydicom
to choose and check the series, then hands ITK the sorted file list. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE = r"""
import json, sys, time
folder, how = sys.argv[1], sys.argv[2]
if how == "medfm":
    from medfm.io import LoadScan
    start = time.perf_counter(); image = LoadScan()(folder); shape = tuple(image.shape)
else:
    import itk
    start = time.perf_counter()
    names = itk.GDCMSeriesFileNames.New(Directory=folder)
    files = names.GetFileNames(names.GetSeriesUIDs()[0])
    image = itk.array_from_image(itk.imread(files)); shape = tuple(image.shape)
seconds = time.perf_counter() - start
# VmHWM belongs to this process image (ru_maxrss would carry the parent's peak across fork + exec)
peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_mib": peak_kib / 1024, "shape": shape}))
"""


def write_series(folder: Path, slices: int) -> None:
    import nibabel as nib
    import numpy as np
    import torch

    import medfm

    sample = nib.load(medfm.samples.path("ct_head"))
    volume = torch.from_numpy(np.asarray(sample.dataobj, dtype=np.float32))[None, None]
    resized = torch.nn.functional.interpolate(volume, size=(512, 512, slices), mode="trilinear")[0, 0].round()
    zooms = np.asarray(sample.header.get_zooms()) * np.asarray(sample.shape) / np.asarray((512, 512, slices))
    affine = sample.affine.copy()
    affine[:3, :3] = affine[:3, :3] / np.asarray(sample.header.get_zooms()) * zooms
    nifti = folder.parent / "source.nii.gz"
    nib.save(nib.Nifti1Image(resized.numpy().astype(np.int16), affine), nifti)
    medfm.samples.write_dicom_series(str(nifti), folder, modality="CT")


def measure(folder: Path, how: str) -> dict:
    result = subprocess.run([sys.executable, "-c", MEASURE, str(folder), how], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3, help="runs per reader (median time, max memory)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the series (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as temporary:
        folder = Path(temporary) / "series"
        write_series(folder, args.slices)
        measure(folder, "itk")  # warm the page cache so both readers see the same I/O
        rows = {}
        for how in ("itk", "medfm"):
            runs = [measure(folder, how) for _ in range(args.repeats)]
            rows[how] = (statistics.median(r["seconds"] for r in runs), max(r["peak_mib"] for r in runs), runs[0]["shape"])
    print(f"512x512x{args.slices} int16 DICOM series ({args.slices} files), {args.repeats} runs each, fresh process per run")
    print(f"| {'reader':<26} | {'seconds':>8} | {'peak MiB':>9} | shape |")
    print(f"|{'-' * 28}|{'-' * 10}|{'-' * 11}|-------|")
    for how, label in (("itk", "ITK series reader + array"), ("medfm", "medfm LoadScan")):
        seconds, peak, shape = rows[how]
        print(f"| {label:<26} | {seconds:8.2f} | {peak:9.0f} | {shape} |")
    print(f"medfm / ITK time: {rows['medfm'][0] / rows['itk'][0]:.2f}x (target: within 1.2x)")


if __name__ == "__main__":
    main()
