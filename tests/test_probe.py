"""medfm probe end to end on crops of a real head CT and a real T1 MRI, labelled by modality."""

import csv
import json
import shutil
import sys

import nibabel as nib
import numpy as np
import pytest

import medfm
from medfm.errors import MedfmError
from medfm.probe import probe_splits, read_label_table
from tests.conftest import GENESIS, crop_nifti, run_command

PROBE = [sys.executable, "-m", "medfm", "probe"]


@pytest.fixture(scope="module")
def modality_table(tmp_path_factory, real_file):
    """24 crops (32 x 32 x 16): 12 of the sample head CT, 12 of the Colin27 T1, two neighbouring crops per subject."""
    folder = tmp_path_factory.mktemp("modality")
    sources = {"ct": medfm.samples.path("ct_head"), "mr": str(real_file("colin27_t1"))}
    rows = []
    for label, source in sources.items():
        shape = nib.load(source).shape
        for group in range(6):
            for k in range(2):
                offset = ((shape[0] - 40) * (group % 3) // 3 + 4 * k, (shape[1] - 40) * (group // 3) // 2 + 4 * k,
                          (shape[2] - 20) // 2)
                crop_nifti(source, folder / f"{label}_{group}_{k}.nii.gz", (32, 32, 16), offset)
                rows.append({"image": f"{label}_{group}_{k}.nii.gz", "label": label, "subject": f"{label}{group}"})
    with open(folder / "labels.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["image", "label", "subject"])
        writer.writeheader()
        writer.writerows(rows)
    return folder / "labels.csv"


def summary_of(path) -> dict:
    with open(path, newline="") as stream:
        return {(r["bundle"], r["features"], r["probe"], float(r["fraction"]), r["metric"]): r for r in csv.DictReader(stream)}


def test_probe_learns_the_modality_keeps_the_control_at_chance_and_reuses_embeddings(modality_table, tmp_path):
    out = tmp_path / "probe"
    args = ["models_genesis_chest_ct", "--table", str(modality_table), "--out", str(out), "--folds", "3",
            "--repeats", "3", "--fractions", "0.5,1", "--group_column", "subject", "--progress", "False"]
    result = run_command(PROBE + args)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summary_of(out / "probe_summary.csv")
    pretrained = summary[("models_genesis_chest_ct", "pretrained", "logistic", 1.0, "auc")]
    assert float(pretrained["mean"]) > 0.9 and int(pretrained["n"]) == 9  # 3 folds x 3 repeats
    permuted = [float(r["mean"]) for k, r in summary.items() if k[1] == "permuted" and k[4] == "auc"]
    assert len(permuted) == 4 and abs(np.mean(permuted) - 0.5) < 0.15, permuted
    assert {k[1] for k in summary} == {"pretrained", "random_init", "histogram", "permuted"}
    with open(out / "probe_folds.csv", newline="") as stream:
        folds = list(csv.DictReader(stream))
    assert len(folds) == 4 * 2 * 2 * 9 * 2  # features x probes x fractions x (folds x repeats) x metrics
    assert (out / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| models_genesis_chest_ct | pretrained | logistic |" in (out / "probe.md").read_text()
    record = (out / "probe_record.json").read_text()
    assert '"--group_column"' in record and '"pretrained_weights"' in record and '"random_init_weights": "none"' in record
    assert any("is outside the pre-training range" in warning for warning in json.loads(record)["warnings"])

    embeddings = sorted((out / "embeddings").rglob("*.npy"))
    assert len(embeddings) == 48
    stamps = [p.stat().st_mtime_ns for p in embeddings]
    again = run_command(PROBE + args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [p.stat().st_mtime_ns for p in embeddings] == stamps  # nothing embedded again
    assert summary_of(out / "probe_summary.csv") == summary  # same splits, same numbers


def test_a_bundle_without_weights_gets_its_baselines_only_and_says_so(modality_table, tmp_path, capsys):
    from medfm.probe import probe

    bundle = tmp_path / "genesis_without_weights"
    shutil.copytree(GENESIS, bundle, ignore=shutil.ignore_patterns("models", "eval", "pretrain", "finetune"))
    out = tmp_path / "probe"
    probe([str(bundle)], modality_table, out=out, folds=3, repeats=1, fractions=[1.0], group_column="subject",
          progress=False)
    assert "has no weights installed" in capsys.readouterr().err
    summary = summary_of(out / "probe_summary.csv")
    assert {k[1] for k in summary} == {"random_init", "histogram", "permuted"}
    permuted = [float(r["mean"]) for k, r in summary.items() if k[1] == "permuted" and k[4] == "auc"]
    assert abs(np.mean(permuted) - 0.5) < 0.2, permuted
    record = json.loads((out / "probe_record.json").read_text())
    assert record["bundles"][bundle.name]["permuted_control_of"] == "random_init"
    assert "pretrained_weights" not in record["bundles"][bundle.name]
    assert "no pretrained rows" in (out / "probe.md").read_text()


def test_no_subject_sits_on_both_sides_and_fractions_stay_inside_the_training_part(modality_table):
    table = read_label_table(modality_table, group_column="subject")
    splits = probe_splits(table, folds=3, repeats=2, fractions=(0.25, 1.0), seed=5)
    assert len(splits) == 3 * 2 * 2
    for split in splits:
        assert not set(table.groups[split.train]) & set(table.groups[split.test])
        assert set(table.labels[split.test]) == {0, 1}  # stratified: both classes in every test fold
    full = {(s.repeat, s.fold): set(s.train) for s in splits if s.fraction == 1.0}
    for split in (s for s in splits if s.fraction == 0.25):
        assert set(split.train) < full[(split.repeat, split.fold)]
        assert all((table.labels[split.train] == c).sum() >= 2 for c in (0, 1))
    assert [s.train.tolist() for s in splits] == [s.train.tolist() for s in probe_splits(table, 3, 2, (0.25, 1.0), 5)]


@pytest.mark.parametrize("rows, message", [
    ([("ct_0_0.nii.gz", "ct"), ("nowhere.nii.gz", "mr")], "1 scans do not exist, e.g. "),
    ([("ct_0_0.nii.gz", "ct"), ("ct_0_1.nii.gz", "ct")], "every row has the label 'ct'; a classification probe needs two classes"),
    ([("ct_0_0.nii.gz", "ct"), ("ct_0_1.nii.gz", "ct"), ("mr_0_0.nii.gz", "mr"), ("mr_0_1.nii.gz", "ct")],
     "class 'mr' has 1 subjects, fewer than --folds 3"),
    ([("ct_0_0.nii.gz", "ct"), ("mr_0_0.nii.gz", "NA"), ("mr_0_1.nii.gz", "mr"), ("ct_0_1.nii.gz", "")],
     "column 'label' is empty or NA in 2 of 4 rows (lines 3, 5); fill them or leave those rows out"),
])
def test_bad_tables_are_one_line_errors_and_write_nothing(modality_table, tmp_path, rows, message):
    table = modality_table.parent / f"bad_{len(rows)}_{rows[-1][1]}.csv"
    table.write_text("image,label\n" + "".join(f"{image},{label}\n" for image, label in rows))
    out = tmp_path / "probe"
    result = run_command(PROBE + ["models_genesis_chest_ct", "--table", str(table), "--out", str(out), "--folds", "3"])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert message in result.stderr and str(table) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_a_label_column_the_table_lacks_is_named_with_the_columns_it_has(modality_table):
    with pytest.raises(MedfmError, match=r"has no column 'diagnosis' \(it has image, label, subject\); choose the label"):
        read_label_table(modality_table, label_column="diagnosis")


def test_a_decathlon_dataset_json_with_class_labels_is_a_table_and_label_images_are_refused(modality_table):
    folder = modality_table.parent
    items = [{"image": f"{m}_{g}_0.nii.gz", "label": int(m == "mr")} for m in ("ct", "mr") for g in range(3)]
    (folder / "dataset.json").write_text(json.dumps({"name": "modality", "training": items}))
    table = read_label_table(folder / "dataset.json")
    assert table.classes == ["0", "1"] and table.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert table.images[0] == str(folder / "ct_0_0.nii.gz")
    segmentation = [{"image": "ct_0_0.nii.gz", "label": "ct_0_1.nii.gz"}]
    (folder / "segmentation.json").write_text(json.dumps({"training": segmentation}))
    with pytest.raises(medfm.errors.MedfmError, match="holds label images, not one class or value per scan"):
        read_label_table(folder / "segmentation.json")


def test_regression_probes_predict_a_learnable_value_and_report_r2_and_mae(modality_table):
    """A numeric target every intensity feature carries (the patch's mean intensity), grouped by subject."""
    from medfm.probe import intensity_features, score_probe

    folder = modality_table.parent
    with open(modality_table, newline="") as stream:
        rows = list(csv.DictReader(stream))
    means = {row["image"]: float(np.asarray(nib.load(folder / row["image"]).dataobj).mean()) for row in rows}
    table_file = folder / "mean_intensity.csv"
    table_file.write_text("image,label,subject\n" + "".join(f"{r['image']},{means[r['image']]},{r['subject']}\n" for r in rows))
    table = read_label_table(table_file, task="regression", group_column="subject")
    features = intensity_features(table, folder / "intensity_cache.npz", progress=False)
    splits = probe_splits(table, folds=3, repeats=1, fractions=(1.0,), seed=0)
    for split in splits:
        assert not set(table.groups[split.train]) & set(table.groups[split.test])
        scores = {kind: score_probe(features, table.labels, table.groups, split, "regression", kind) for kind in ("ridge", "knn")}
        assert set(scores["ridge"]) == {"r2", "mae"} and scores["ridge"]["r2"] > 0.8, scores
    with pytest.raises(medfm.errors.MedfmError, match="must be numeric for --task regression"):
        read_label_table(modality_table, task="regression")


@pytest.fixture(scope="module")
def point_table(modality_table):
    """The modality crops as a region-level table: two points (x, y, z in mm, LPS) in each crop."""
    from medfm.transforms.region import voxel_to_lps

    rows = []
    with open(modality_table, newline="") as stream:
        for row in csv.DictReader(stream):
            affine = nib.load(modality_table.parent / row["image"]).affine
            for voxel in ((12, 16, 8), (20, 16, 8)):
                x, y, z = voxel_to_lps(affine, voxel)
                rows.append(dict(row, x=x, y=y, z=z))
    path = modality_table.parent / "points.csv"
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_a_region_level_table_embeds_each_point_and_keeps_each_scan_on_one_side(point_table, tmp_path):
    table = read_label_table(point_table)  # no group column: the scan is the group
    assert table.points.shape == (48, 3)
    for split in probe_splits(table, folds=3, repeats=1, fractions=[1.0]):
        assert not set(np.array(table.images)[split.train]) & set(np.array(table.images)[split.test])
    out = tmp_path / "probe"
    args = ["models_genesis_chest_ct", "--table", str(point_table), "--out", str(out), "--folds", "3", "--repeats", "2",
            "--fractions", "1", "--group_column", "subject", "--progress", "False"]
    result = run_command(PROBE + args)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summary_of(out / "probe_summary.csv")
    assert float(summary[("models_genesis_chest_ct", "pretrained", "logistic", 1.0, "auc")]["mean"]) > 0.9
    permuted = [float(r["mean"]) for k, r in summary.items() if k[1] == "permuted" and k[4] == "auc"]
    assert abs(np.mean(permuted) - 0.5) < 0.2, permuted
    with open(out / "embeddings" / "models_genesis_chest_ct" / "pretrained" / "embeddings.csv", newline="") as stream:
        index = list(csv.DictReader(stream))
    assert sorted(row["region"] for row in index) == sorted(f"point:row{n}" for n in range(48))
    embeddings = sorted((out / "embeddings").rglob("*.npy"))
    assert len(embeddings) == 2 * 48  # pretrained and random weights, one per point
    assert "points (x, y, z mm, LPS)" in (out / "probe_record.json").read_text()
    stamps = [p.stat().st_mtime_ns for p in embeddings]
    assert run_command(PROBE + args).returncode == 0
    assert [p.stat().st_mtime_ns for p in embeddings] == stamps  # every point reused


def test_a_point_outside_its_scan_or_half_given_coordinates_are_one_line_errors(point_table, tmp_path):
    rows = point_table.read_text().splitlines()
    header = rows[0].split(",")
    broken = rows[1].split(",")
    broken[header.index("x")] = "5000"
    (point_table.parent / "outside.csv").write_text("\n".join([rows[0], ",".join(broken), *rows[2:]]) + "\n")
    result = run_command(PROBE + ["models_genesis_chest_ct", "--table", str(point_table.parent / "outside.csv"),
                                  "--out", str(tmp_path / "out"), "--folds", "3", "--repeats", "1", "--fractions", "1",
                                  "--group_column", "subject", "--progress", "False"])
    assert result.returncode == 1 and "1 points failed to embed with models_genesis_chest_ct" in result.stderr
    assert "lies outside the scan" in result.stderr and "Traceback" not in result.stderr
    blank = rows[1].split(",")
    blank[header.index("z")] = ""
    (point_table.parent / "half.csv").write_text("\n".join([rows[0], ",".join(blank), *rows[2:]]) + "\n")
    with pytest.raises(MedfmError, match="needs x, y and z"):
        read_label_table(point_table.parent / "half.csv")


def test_a_training_part_smaller_than_the_default_k_still_fits_every_probe():
    """Four training scans of two classes (one subject each): too few to choose k inside them, and fewer than
    kNN's default 5 neighbours; the probe fits with k capped at what there is instead of failing."""
    from medfm.probe import Split, score_probe

    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 4)
    features = rng.normal(size=(8, 6)) + labels[:, None] * 3.0
    split = Split(repeat=0, fold=0, fraction=1.0, train=np.arange(4), test=np.arange(4, 8))
    for kind in ("logistic", "knn"):
        scores = score_probe(features, labels, np.arange(8), split, "classification", kind, num_classes=2)
        assert scores["auc"] == 1.0, (kind, scores)
