"""Evidence for the model cards: `medfm probe` on a real labelled task built from the data reachable here.

    .venv/bin/python tests/testdata.py                 # the real templates and the AAL atlas
    .venv/bin/python benchmarks/probe_evidence.py [--bundles models_genesis_chest_ct] [--out DIR]

Task ("which lobe is this patch centred in?"): 64 x 64 x 32 mm patches of two real skull-stripped
T1 brain templates that share the MNI space of the AAL atlas (Colin27 ``ch2bet``, one subject;
the MNI152 2009a average), centred on a 20 mm grid, labelled by the lobe of the AAL region at
the patch centre (frontal, temporal, parietal, occipital, cerebellum; centres in other regions
or outside the atlas are skipped). A patch of one template and the patch at the same place in the
other are near copies, so the probe's groups are 32 mm blocks of space: no block is ever on both
sides of a split. Bundles without installed weights get their baselines only (the untrained network,
and the permuted control on its features): the floor their weights must beat, once imported. Results (the
probe's outputs) go to ``--out``; with ``--write_docs``, each bundle's ``docs/probe_lobe_summary.csv``
(its rows and the histogram baseline's) and ``docs/probe_lobe.png`` are this script's output for the
weights installed when it was run.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import time
from pathlib import Path

from benchmark_tables import write_rows  # beside this script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: AAL region-name prefixes -> lobe (regions not listed, e.g. insula, cingulum, deep grey matter, are skipped).
LOBES = {
    "frontal": ("Precentral", "Frontal", "Supp_Motor_Area", "Olfactory", "Rectus", "Paracentral_Lobule"),
    "temporal": ("Temporal", "Heschl", "Fusiform", "Hippocampus", "ParaHippocampal"),
    "parietal": ("Postcentral", "Parietal", "SupraMarginal", "Angular", "Precuneus"),
    "occipital": ("Occipital", "Calcarine", "Cuneus", "Lingual"),
    "cerebellum": ("Cerebelum", "Vermis"),
}
PATCH_MM = (64, 64, 32)
GRID_MM = 20
BLOCK_MM = 32


def lobe_of(name: str) -> str | None:
    return next((lobe for lobe, prefixes in LOBES.items() if name.startswith(prefixes)), None)


def build_task(folder: Path) -> Path:
    """Write the patches and ``labels.csv`` (image, label, block) into ``folder``; return the table."""
    import nibabel as nib
    import numpy as np

    from tests import testdata

    atlas = nib.load(testdata.FILES["aal_atlas"].path)
    labels = np.asarray(atlas.dataobj).astype(int)
    names = {}
    for line in filter(str.strip, testdata.FILES["aal_atlas_names"].path.read_text().splitlines()):
        index, name, *_ = line.split()
        names[int(index)] = name
    templates = {"colin27": testdata.FILES["colin27_t1_brain"].path, "mni152": testdata.FILES["mni152_2009a_t1"].path}
    half = np.asarray(PATCH_MM) // 2
    rows = []
    folder.mkdir(parents=True, exist_ok=True)
    loaded = {key: nib.load(path) for key, path in templates.items()}
    volumes = {key: np.asarray(image.dataobj, dtype=np.float32) for key, image in loaded.items()}
    world_of_atlas = atlas.affine
    for i in range(0, labels.shape[0], GRID_MM):
        for j in range(0, labels.shape[1], GRID_MM):
            for k in range(0, labels.shape[2], GRID_MM):
                lobe = lobe_of(names.get(int(labels[i, j, k]), ""))
                if lobe is None:
                    continue
                centre = world_of_atlas @ np.array([i, j, k, 1.0])
                block = "_".join(str(int(c // BLOCK_MM)) for c in centre[:3])
                for key, image in loaded.items():
                    voxel = np.rint(np.linalg.inv(image.affine) @ centre)[:3].astype(int)
                    start = voxel - half
                    if (start < 0).any() or (start + PATCH_MM > np.asarray(image.shape[:3])).any():
                        continue
                    window = tuple(slice(s, s + n) for s, n in zip(start, PATCH_MM))
                    affine = image.affine.copy()
                    affine[:3, 3] = image.affine[:3, :3] @ start + image.affine[:3, 3]
                    name = f"{key}_{i}_{j}_{k}.nii.gz"
                    nib.save(nib.Nifti1Image(volumes[key][window], affine), folder / name)
                    rows.append({"image": name, "label": lobe, "block": block})
    with open(folder / "labels.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["image", "label", "block"])
        writer.writeheader()
        writer.writerows(rows)
    return folder / "labels.csv"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", default="models_genesis_chest_ct,universal_model_sar,vdt_resnet3d18,spad_vit_base")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "probe_evidence"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--fractions", default="0.1,0.25,1")
    parser.add_argument("--write_docs", action="store_true", help="copy each bundle's results into its docs/")
    args = parser.parse_args()

    from medfm.bundles import find_bundle
    from medfm.probe import probe
    from tests import testdata

    problems = testdata.fetch()
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    out = Path(args.out)
    table = build_task(out / "task")
    bundles = args.bundles.split(",")
    start = time.perf_counter()
    probe(bundles, table, out=out, fractions=[float(f) for f in args.fractions.split(",")], folds=args.folds,
          repeats=args.repeats, group_column="block", command=sys.argv)
    print(f"{len(bundles)} bundles in {time.perf_counter() - start:.0f} s")
    print((out / "probe.md").read_text())
    if args.write_docs:
        for name in bundles:
            docs = find_bundle(name) / "docs"
            with open(out / "probe_summary.csv", newline="") as stream:
                rows = [r for r in csv.DictReader(stream) if r["bundle"] in (name, "-")]
            write_rows(rows, docs / "probe_lobe_summary.csv")
            shutil.copyfile(out / "probe.png", docs / "probe_lobe.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
