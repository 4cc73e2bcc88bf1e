"""Does data loading keep up with pre-training? Pretext-transform rate per loader worker against the training-step rate.

    .venv/bin/python benchmarks/pretrain_pipeline.py [--stages genesis,sar,...] [--steps 3] [--items 6] [--out DIR]

For every pre-training stage (each bundle's ``configs/pretrain.json``, both Medical Transformer
stages and both SPAD stages), built from the bundle's own config with its default sizes unless
noted in the table, on real images (the embedded samples, slices of them for VDT):

- **loader**: training samples (network inputs: Models Genesis cuts several cubes from each volume)
  per second one loader worker produces, i.e. ``train#dataset[i]`` in this process (for a ``CacheDataset``
  that is the random part of the chain on a cached item, which is what a worker repeats every epoch;
  for VDT's plain ``Dataset`` the whole chain from the file);
- **step**: samples per second of the trainer's own iteration (prepare the batch, forward, loss, backward,
  optimizer step) on a batch of the config's batch size, on CUDA when present, else on this CPU;
- **workers**: loader workers a process needs so that the loader is not slower than the step
  (step rate / loader rate, rounded up).

One thread per measurement (``torch.set_num_threads(--threads)``), medians over ``--steps`` steps after
one warm-up step. Nothing here is asserted; the table is printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmark_tables import write_rows  # beside this script

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"


def slice_folder(root: Path) -> Path:
    """An ImageFolder tree of axial PNG slices of the embedded CT and MR (VDT's pre-training input)."""
    import nibabel as nib
    from PIL import Image

    import medfm

    for name, sample in (("ct_head", "ct_head"), ("mr_head", "mr_head_t1")):
        volume = np.asarray(nib.load(medfm.samples.path(sample)).dataobj, dtype=np.float32)
        volume = (volume - volume.min()) / (volume.max() - volume.min()) * 255
        (root / name).mkdir(parents=True, exist_ok=True)
        for z in np.linspace(volume.shape[2] * 0.3, volume.shape[2] * 0.7, 8).astype(int):
            Image.fromarray(volume[:, :, z].astype(np.uint8)).save(root / name / f"{z}.png")
    return root


def stages(work: Path) -> dict[str, tuple[str, list[str], dict]]:
    """name -> (bundle, configs, overrides): the bundles' pre-training stages on the embedded samples."""
    import medfm

    samples = medfm.samples.directory()
    t1 = work / "t1.json"
    t1.write_text(f'[{{"image": "{medfm.samples.path("mr_head_t1")}", "subject": "a"}}, '
                  f'{{"image": "{medfm.samples.path("mr_head_t1")}", "subject": "b"}}]')
    spad = {"data_dir": samples, "image_glob": "*.nii*"}
    return {
        "genesis": ("models_genesis_chest_ct", ["pretrain.json"], {}),
        "sar": ("universal_model_sar", ["pretrain.json"], {}),
        "medical_transformer stage 1": ("medical_transformer_brain_mri", ["pretrain.json"], {"datalist": str(t1), "stage": 1, "volumes_per_batch": 2}),
        "medical_transformer stage 2": ("medical_transformer_brain_mri", ["pretrain.json"], {"datalist": str(t1), "stage": 2, "volumes_per_batch": 2}),
        "spad tokenizer": ("spad_vit_base", ["pretrain.json", "pretrain_tokenizer.json"], dict(spad, batch_size=2)),
        "spad mim": ("spad_vit_base", ["pretrain.json"], dict(spad, batch_size=2)),
        "vdt": ("vdt_resnet3d18", ["pretrain.json"], {"data_dir": str(slice_folder(work / "slices")), "batch_size": 8,
                                                       "val_fraction": 0.2}),
    }


def measure(bundle: str, configs: list[str], overrides: dict, work: Path, steps: int, items: int) -> dict:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / name) for name in configs])
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    parser.update({"bundle_root": str(BUNDLES / bundle), "output_dir": str(work / bundle), "num_workers": 0,
                   "device": f"$torch.device('{device}')", **overrides})
    parser.get_parsed_content("initialize")
    dataset = parser.get_parsed_content("train#dataset")
    dataset[0]  # first touch (imports, lazy caches)
    samples, started = 0, time.perf_counter()
    for index in range(items):
        item = dataset[index % len(dataset)]
        samples += len(item) if isinstance(item, list) else 1  # several crops of one volume are several samples
    loader_rate = samples / (time.perf_counter() - started)

    trainer = parser.get_parsed_content("train#trainer")
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    batch_samples = len(batch["source"])
    trainer.state.iteration, trainer.state.epoch_length = 1, 1
    seconds = []
    for step in range(steps + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        trainer._iteration(trainer, batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step:  # the first step warms up
            seconds.append(time.perf_counter() - started)
    step_rate = batch_samples / statistics.median(seconds)
    return {"loader_samples_per_s_per_worker": round(loader_rate, 2), "batch_samples": batch_samples,
            "step_s": round(statistics.median(seconds), 3), "step_samples_per_s": round(step_rate, 2),
            "workers_needed": max(1, math.ceil(step_rate / loader_rate)), "device": device}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="", help="comma-separated stage names (default: all)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--items", type=int, default=6, help="dataset items drawn per stage (cycling over the dataset)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        chosen = stages(work)
        wanted = [name.strip() for name in args.stages.split(",") if name.strip()] or list(chosen)
        for name in wanted:
            bundle, configs, overrides = chosen[name]
            row = {"stage": name, **measure(bundle, configs, overrides, work, args.steps, args.items)}
            rows.append(row)
            print(row, flush=True)
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)\n")
    print("| stage | loader samples/s per worker | samples per batch | step s | step samples/s | workers needed |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['stage']} | {row['loader_samples_per_s_per_worker']} | {row['batch_samples']} | {row['step_s']} | "
              f"{row['step_samples_per_s']} | {row['workers_needed']} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_rows(rows, args.out / "pretrain_pipeline.csv")


if __name__ == "__main__":
    main()
