"""Frozen-feature probes: is a bundle's embedding any good on a labelled table, and with how many labels?

One call embeds every scan of the table with each bundle (reusing embeddings already in the output
folder), then fits simple probes (scikit-learn) on fixed, seeded splits shared by every bundle and
baseline, at several fractions of the training labels. Baselines on the same splits: the same
network with random weights, a non-learned intensity-distribution feature, and the pretrained
features with permuted labels (which must land at chance; anything else means leakage).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MedfmError
from .io.atomic import atomic_path

__all__ = ["FEATURES", "METRICS", "LabelTable", "Split", "intensity_features", "probe", "read_label_table",
           "probe_splits", "score_probe"]

#: Feature sets compared per bundle (``histogram`` is the same for every bundle).
FEATURES = ("pretrained", "random_init", "histogram", "permuted")
#: Metrics per task; the first is the one plotted and tabled.
METRICS = {"classification": ("auc", "balanced_accuracy"), "regression": ("r2", "mae")}
PROBES = {"classification": ("logistic", "knn"), "regression": ("ridge", "knn")}
DEFAULT_FRACTIONS = (0.05, 0.1, 0.25, 0.5, 1.0)
#: Quantile levels of the intensity feature (the inverse of the intensity histogram).
QUANTILES = np.linspace(0.005, 0.995, 33)
#: Side (mm) of the cube around each point of a region-level table that the intensity baseline reads.
POINT_REGION_MM = 48.0
SUMMARY_COLUMNS = ("bundle", "features", "probe", "fraction", "metric", "mean", "std", "n")
FOLD_COLUMNS = ("bundle", "features", "probe", "fraction", "repeat", "fold", "n_train", "n_test", "metric", "value")


@dataclass
class LabelTable:
    """Scans (or points in them), their labels (class indices or values) and groups, in table order."""

    source: Path
    images: list[str]
    labels: np.ndarray
    groups: np.ndarray
    classes: list[str] | None  # classification: sorted class names, ``labels`` index them
    points: np.ndarray | None = None  # region-level tables: (rows, 3) world points, mm, LPS

    def point_id(self, row: int) -> str:
        """The region name the embedding index gives row ``row``'s point."""
        return f"point:row{row}"


@dataclass(frozen=True)
class Split:
    repeat: int
    fold: int
    fraction: float
    train: np.ndarray
    test: np.ndarray


def _rows_of(path: Path) -> list[dict]:
    if path.suffix.lower() == ".json":  # a Decathlon dataset.json whose labels are classes or values
        try:
            items = json.loads(path.read_text(encoding="utf-8")).get("training")
        except (OSError, ValueError, AttributeError) as error:
            raise MedfmError(f"{path}: not a readable dataset.json ({error})") from None
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise MedfmError(f"{path}: its 'training' entry is not a list of {{'image', 'label'}} objects")
        return items
    try:
        with open(path, newline="", encoding="utf-8") as stream:
            return list(csv.DictReader(stream))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise MedfmError(f"{path}: not a readable CSV table ({error})") from None


def read_label_table(path: str | os.PathLike, task: str = "classification", label_column: str = "label",
                     group_column: str | None = None) -> LabelTable:
    """Read ``image, label[, group][, x, y, z]`` rows (CSV, or a Decathlon ``dataset.json``); image paths
    relative to the table. With ``x, y, z`` (mm, LPS) every row is a point in its scan (a region-level
    task; the points of one scan form one group unless ``group_column`` says otherwise). Refuses missing
    scans, a scan or point listed twice, a single class, non-numeric regression targets."""
    path = Path(path).expanduser()
    if task not in METRICS:
        raise MedfmError(f"--task must be one of {', '.join(METRICS)}, got {task!r}")
    rows = _rows_of(path)
    if not rows:
        raise MedfmError(f"{path}: no rows")
    for column in ("image", label_column, *([group_column] if group_column else [])):
        if all(column not in row for row in rows):
            present = sorted({key for row in rows for key in row})
            raise MedfmError(f"{path}: has no column {column!r} (it has {', '.join(present)})"
                             f"{'; choose the label with --label_column' if column == label_column else ''}")
        empty = [number for number, row in enumerate(rows, start=2 if path.suffix.lower() == ".csv" else 1)
                 if _is_missing(row.get(column))]
        if empty:
            where = "lines" if path.suffix.lower() == ".csv" else "entries"
            shown = ", ".join(map(str, empty[:5])) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
            raise MedfmError(f"{path}: column {column!r} is empty or NA in {len(empty)} of {len(rows)} rows ({where} "
                             f"{shown}); fill them or leave those rows out: a missing value is not a class")
    if any(isinstance(row[label_column], (list, dict)) or str(row[label_column]).endswith((".nii", ".nii.gz"))
           for row in rows):
        raise MedfmError(f"{path}: {label_column!r} holds label images, not one class or value per scan")
    images = [str((path.parent / str(row["image"])).resolve()) for row in rows]
    missing = [image for image in images if not os.path.exists(image)]
    if missing:
        raise MedfmError(f"{path}: {len(set(missing))} scans do not exist, e.g. {missing[0]}")
    points = _points_of(path, rows)
    keys = images if points is None else list(zip(images, map(tuple, points)))
    if len(set(keys)) != len(keys):
        repeated = next(key for key in keys if keys.count(key) > 1)
        raise MedfmError(f"{path}: {'a scan' if points is None else 'a point'} is listed twice ({repeated})")
    raw = [str(row[label_column]) for row in rows]
    if task == "classification":
        classes = sorted(set(raw))
        if len(classes) < 2:
            raise MedfmError(f"{path}: every row has the label {classes[0]!r}; a classification probe needs two classes")
        labels = np.array([classes.index(value) for value in raw])
    else:
        classes = None
        try:
            labels = np.array([float(value) for value in raw])
        except ValueError:
            raise MedfmError(f"{path}: {label_column!r} must be numeric for --task regression") from None
        if not np.isfinite(labels).all():
            raise MedfmError(f"{path}: {label_column!r} holds a non-finite value")
    # without a group column each scan is a group: its points are never on both sides of a split
    groups = np.array([str(row[group_column]) for row in rows]) if group_column else np.array(images)
    return LabelTable(path, images, labels, groups, classes, points)


#: Cell values that spreadsheets and R write for a missing value (compared case-insensitively).
MISSING_VALUES = {"", "na", "n/a", "nan", "none", "null"}


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in MISSING_VALUES) or \
        (isinstance(value, float) and math.isnan(value))


def _points_of(path: Path, rows: list[dict]) -> np.ndarray | None:
    """The rows' ``x, y, z`` (mm, LPS) when the table has them: a region-level task."""
    given = [axis for axis in "xyz" if any(row.get(axis) not in (None, "") for row in rows)]
    if not given:
        return None
    if any(row.get(axis) in (None, "") for row in rows for axis in "xyz"):
        raise MedfmError(f"{path}: a region-level table needs x, y and z (mm, LPS) in every row")
    try:
        points = np.array([[float(row[axis]) for axis in "xyz"] for row in rows])
    except (TypeError, ValueError):
        raise MedfmError(f"{path}: x, y and z must be numbers (mm, LPS)") from None
    if not np.isfinite(points).all():
        raise MedfmError(f"{path}: x, y and z must be finite")
    return points


def _check_foldable(table: LabelTable, folds: int) -> None:
    if folds < 2:
        raise MedfmError(f"--folds must be at least 2, got {folds}")
    if len(set(table.groups)) < folds:
        raise MedfmError(f"{table.source}: {len(set(table.groups))} subjects (groups), fewer than --folds {folds}")
    if table.classes is not None:
        counts = np.bincount(table.labels, minlength=len(table.classes))
        rarest = int(counts.argmin())
        groups_of_rarest = len(set(table.groups[table.labels == rarest]))
        if groups_of_rarest < folds:
            raise MedfmError(f"{table.source}: class {table.classes[rarest]!r} has {groups_of_rarest} subjects, "
                             f"fewer than --folds {folds}: every test fold needs every class")


def _labelled_subset(train: np.ndarray, table: LabelTable, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Whole groups of ``train``, in random order, until ``fraction`` of it is covered and (for
    classification) every class has two scans."""
    if fraction >= 1:
        return train
    groups = table.groups[train]
    order = rng.permutation(np.unique(groups))
    wanted = math.ceil(fraction * len(train))
    chosen: list[int] = []
    for group in order:
        chosen.extend(train[groups == group].tolist())
        labels = table.labels[chosen]
        enough_classes = table.classes is None or all((labels == c).sum() >= 2 for c in np.unique(table.labels[train]))
        if len(chosen) >= max(wanted, 2) and enough_classes:
            break
    return np.sort(np.array(chosen))


def probe_splits(table: LabelTable, folds: int = 5, repeats: int = 3, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 seed: int = 0) -> list[Split]:
    """Seeded (stratified, grouped) k-fold splits, repeated; each fraction drawn inside each training part.

    They depend only on the table and the seed, so every bundle and baseline gets the same ones.
    """
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    _check_foldable(table, folds)
    if any(not 0 < f <= 1 for f in fractions):
        raise MedfmError(f"--fractions must lie in (0, 1], got {list(fractions)}")
    splits = []
    for repeat in range(repeats):
        if table.classes is not None:
            splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + repeat)
        else:
            splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed + repeat)
        for fold, (train, test) in enumerate(splitter.split(np.zeros(len(table.labels)), table.labels, table.groups)):
            for fraction in sorted(fractions):
                rng = np.random.default_rng([seed, repeat, fold, round(fraction * 1e6)])
                splits.append(Split(repeat, fold, float(fraction), _labelled_subset(train, table, fraction, rng), test))
    return splits


def _estimator(task: str, kind: str, labels: np.ndarray, groups: np.ndarray):
    """A standardising pipeline whose hyper-parameter is chosen by cross-validation inside the training data."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.model_selection import GridSearchCV, GroupKFold, StratifiedGroupKFold
    from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    classification = task == "classification"
    if kind == "knn":
        model = KNeighborsClassifier() if classification else KNeighborsRegressor()
        grid = {"model__n_neighbors": [1, 3, 5, 9, 15]}
    elif classification:
        model, grid = LogisticRegression(max_iter=5000), {"model__C": [0.01, 0.1, 1.0, 10.0, 100.0]}
    else:
        model, grid = Ridge(), {"model__alpha": [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]}
    pipeline = Pipeline([("scale", StandardScaler()), ("model", model)])
    if classification:
        inner = min(3, min(len(set(groups[labels == c])) for c in np.unique(labels)))
    else:
        inner = min(3, len(set(groups)))
    if inner < 2:  # too few subjects to choose k or C inside the training part: the defaults, k capped
        if kind == "knn":
            pipeline.set_params(model__n_neighbors=min(pipeline.get_params()["model__n_neighbors"], len(labels)))
        return pipeline, None
    smallest_train = len(labels) - math.ceil(len(labels) / inner)
    if kind == "knn":
        grid = {"model__n_neighbors": [k for k in grid["model__n_neighbors"] if k <= smallest_train] or [1]}
    splitter = StratifiedGroupKFold(inner) if classification else GroupKFold(inner)
    return GridSearchCV(pipeline, grid, cv=splitter), groups


def score_probe(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, split: Split, task: str,
                kind: str, num_classes: int | None = None) -> dict[str, float]:
    """Fit probe ``kind`` on ``split.train`` and return the task's metrics on ``split.test``."""
    from sklearn.metrics import balanced_accuracy_score, mean_absolute_error, r2_score, roc_auc_score

    estimator, fit_groups = _estimator(task, kind, labels[split.train], groups[split.train])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's convergence and small-fold notices
        if fit_groups is None:
            estimator.fit(features[split.train], labels[split.train])
        else:
            estimator.fit(features[split.train], labels[split.train], groups=fit_groups)
    truth = labels[split.test]
    if task == "regression":
        predicted = estimator.predict(features[split.test])
        return {"r2": float(r2_score(truth, predicted)), "mae": float(mean_absolute_error(truth, predicted))}
    probabilities = np.zeros((len(split.test), num_classes))
    probabilities[:, estimator.classes_] = estimator.predict_proba(features[split.test])
    present = np.unique(truth)
    if len(present) < 2:
        auc = float("nan")
    elif num_classes == 2:
        auc = float(roc_auc_score(truth, probabilities[:, 1]))
    else:
        scores = probabilities[:, present] / probabilities[:, present].sum(1, keepdims=True).clip(min=1e-12)
        auc = float(roc_auc_score(truth, scores, multi_class="ovr", labels=present))
    predicted = probabilities.argmax(1)
    return {"auc": auc, "balanced_accuracy": float(balanced_accuracy_score(truth, predicted))}


def intensity_features(table: LabelTable, cache: Path, progress: bool = True) -> np.ndarray:
    """The non-learned baseline: the intensity quantiles (``QUANTILES``), mean and standard deviation of each
    scan, or of the ``POINT_REGION_MM`` cube around each point, in the scan's own units (HU for CT).
    Cached in ``cache`` (one row per scan, or per scan and point)."""
    from tqdm import tqdm

    from .io.reading import LoadScan

    cached = {}
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as stored:
            if "keys" in stored.files:  # else a cache of an older layout: computed again and replaced
                cached = dict(zip(stored["keys"].tolist(), stored["features"]))
    loader = LoadScan()
    rows, known = [], len(cached)
    for row, image in enumerate(tqdm(table.images, desc="intensity features", unit="row", disable=not progress)):
        point = None if table.points is None else table.points[row]
        key = image if point is None else f"{image}@{point[0]:.6g},{point[1]:.6g},{point[2]:.6g}"
        if key not in cached:
            try:
                values = _intensities(loader(image), point)
            except MedfmError as error:
                raise MedfmError(f"intensity feature: {error}") from None
            values = values[np.isfinite(values)]
            cached[key] = np.concatenate([np.quantile(values, QUANTILES), [values.mean(), values.std()]])
        rows.append(cached[key])
    if len(cached) == known:  # a rerun over the same rows reads the cache and writes nothing
        return np.stack(rows)
    with atomic_path(cache) as temporary:
        with open(temporary, "wb") as stream:
            np.savez(stream, keys=np.array(list(cached)), features=np.stack(list(cached.values())))
    return np.stack(rows)


def _intensities(image, point: np.ndarray | None) -> np.ndarray:
    """The scan's voxel values, or those of the cube of side ``POINT_REGION_MM`` centred on ``point`` (mm, LPS)."""
    from .transforms.region import CropAtWorldPoint, PointOutsideScanError

    if point is None:
        return np.asarray(image, dtype=np.float64).ravel()
    spacing = np.linalg.norm(np.asarray(image.affine, dtype=np.float64)[:3, :3], axis=0)
    size = [max(1, round(POINT_REGION_MM / step)) for step in spacing]
    try:
        crop = CropAtWorldPoint(size)(image.unsqueeze(0), point.tolist())  # the crop wants a channel axis
    except PointOutsideScanError as error:
        raise MedfmError(f"{image.meta.get('filename_or_obj', 'scan')}: {error}") from None
    return np.asarray(crop, dtype=np.float64).ravel()


def _points_file(table: LabelTable, folder: Path) -> Path:
    """The table's points as the ``image, x, y, z, id`` CSV ``medfm embed --points`` reads (rewritten each run)."""
    target = folder / "points.csv"
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as temporary:
        with open(temporary, "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["image", "x", "y", "z", "id"])
            for row, (image, point) in enumerate(zip(table.images, table.points)):
                writer.writerow([image, *(repr(float(value)) for value in point), table.point_id(row)[len("point:"):]])
    return target


def _embedding_matrix(bundle: str, table: LabelTable, out_dir: Path, pretrained: bool, seed: int,
                      progress: bool, points_file: Path | None) -> tuple[np.ndarray, str]:
    """Embed the table's scans or points (reusing ``out_dir``'s index), stacked in table order; the weights id."""
    import torch

    from .inference import embed

    overrides = {} if pretrained else {"ckpt_path": None}
    if not pretrained:
        torch.manual_seed(seed)  # the random initialisation, reproducible
    if points_file is None:
        summary = embed(bundle, table.images, out=out_dir, progress=progress, **overrides)
    else:
        summary = embed(bundle, out=out_dir, points=points_file, progress=progress, **overrides)
    if summary.failed:
        (image, _), error = next(iter(summary.failed.items()))
        raise MedfmError(f"{len(summary.failed)} {'scans' if points_file is None else 'points'} failed to embed with "
                         f"{Path(bundle).name} (first: {image}: {error}); see {out_dir / 'failed.csv'}")
    rows = {(os.path.abspath(row["input"]), row["region"]): row for row in summary.rows}
    keys = [(image, "" if points_file is None else table.point_id(row)) for row, image in enumerate(table.images)]
    vectors = [np.load(out_dir / rows[key]["embedding"], allow_pickle=False).ravel() for key in keys]
    return np.stack(vectors).astype(np.float64), rows[keys[0]]["weights"]


def _summary_rows(fold_rows: list[dict]) -> list[dict]:
    cells: dict[tuple, list[float]] = {}
    for row in fold_rows:
        key = (row["bundle"], row["features"], row["probe"], row["fraction"], row["metric"])
        cells.setdefault(key, []).append(row["value"])
    summary = []
    for (bundle, features, kind, fraction, metric), values in cells.items():
        finite = np.array([v for v in values if np.isfinite(v)])
        summary.append({"bundle": bundle, "features": features, "probe": kind, "fraction": fraction, "metric": metric,
                        "mean": float(finite.mean()) if len(finite) else float("nan"),
                        "std": float(finite.std(ddof=1)) if len(finite) > 1 else 0.0, "n": len(finite)})
    return summary


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    with atomic_path(path) as temporary:
        with open(temporary, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})


def _write_markdown(path: Path, summary: list[dict], task: str, table: LabelTable, group_column: str | None,
                    permuted_of: dict[str, str]) -> None:
    metric = METRICS[task][0]
    fractions = sorted({row["fraction"] for row in summary})
    grouped = f"{len(set(table.groups))} groups by {group_column!r}, " if group_column else ""
    lines = [f"Probe of `{table.source.name}`: {len(table.images)} scans, {grouped}"
             f"{task}" + (f" ({', '.join(table.classes)})" if table.classes else "") + f"; {metric}, mean ± sd over folds x repeats.",
             "", "| bundle | features | probe | " + " | ".join(f"{f:g} of the labels" for f in fractions) + " |",
             "|---|---|---|" + "---|" * len(fractions)]
    cells = {(r["bundle"], r["features"], r["probe"], r["fraction"]): r for r in summary if r["metric"] == metric}
    for bundle, features, kind in dict.fromkeys((r["bundle"], r["features"], r["probe"]) for r in summary):
        values = [cells.get((bundle, features, kind, f)) for f in fractions]
        lines.append(f"| {bundle} | {features} | {kind} | " + " | ".join(
            f"{v['mean']:.3f} ± {v['std']:.3f}" if v else "" for v in values) + " |")
    without = sorted(name for name, features in permuted_of.items() if features != "pretrained")
    if without:
        lines += ["", f"No weights were installed for {', '.join(without)}: no pretrained rows, and the permuted "
                      "control shuffles the labels of the random_init features."]
    with atomic_path(path) as temporary:
        temporary.write_text("\n".join(lines) + "\n")


def _write_plot(path: Path, summary: list[dict], task: str) -> None:
    """Label-efficiency curves, one panel per probe, 95% confidence bands (normal approximation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = METRICS[task][0]
    kinds = PROBES[task]
    figure, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    for axis, kind in zip(axes[0], kinds):
        rows = [r for r in summary if r["probe"] == kind and r["metric"] == metric]
        for bundle, features in dict.fromkeys((r["bundle"], r["features"]) for r in rows):
            line = sorted((r for r in rows if r["bundle"] == bundle and r["features"] == features), key=lambda r: r["fraction"])
            x = np.array([r["fraction"] for r in line])
            mean = np.array([r["mean"] for r in line])
            half = np.array([1.96 * r["std"] / math.sqrt(max(r["n"], 1)) for r in line])
            axis.plot(x, mean, marker="o", label=f"{bundle} {features}" if bundle != "-" else features,
                      linestyle="--" if features in ("permuted", "histogram") else "-")
            axis.fill_between(x, mean - half, mean + half, alpha=0.15)
        if metric == "auc":
            axis.axhline(0.5, color="grey", linewidth=0.8)
        axis.set_xscale("log")
        axis.set_xlabel("fraction of the training labels")
        axis.set_ylabel(metric)
        axis.set_title(f"{kind} probe")
        axis.legend(fontsize=7)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)
    plt.close(figure)


def probe(bundles: Sequence[str] | str, table: str | os.PathLike, out: str | os.PathLike = "medfm_probe",
          task: str = "classification", fractions: Sequence[float] = DEFAULT_FRACTIONS, folds: int = 5,
          repeats: int = 3, label_column: str = "label", group_column: str | None = None, seed: int = 0,
          progress: bool = True, command: Sequence[str] | None = None) -> list[dict]:
    """Run the probe benchmark and write its outputs to ``out``; returns the summary rows.

    Writes ``probe_folds.csv`` (every bundle, features, probe, fraction, repeat, fold and metric),
    ``probe_summary.csv`` (mean, std and count over folds x repeats), ``probe.md`` (the main
    metric's table), ``probe.png`` (label-efficiency curves) and ``probe_record.json`` (versions,
    weights, settings, the table's sha256 and ``command``). Embeddings live in
    ``out/embeddings/<bundle>/pretrained`` and ``.../random_init_seed<seed>`` and are reused by the
    next run (an index whose weights differ from the installed ones is refused, never mixed in).
    A bundle without installed weights gets its baselines only (said on stderr and in the record):
    no ``pretrained`` rows, and a permuted control on its ``random_init`` features.
    """
    import sklearn
    import torch
    from tqdm import tqdm

    from . import __version__
    from .bundles import Bundle
    from .run_report import warnings_collected
    from .weights.importer import how_to_get_weights
    from .weights.records import MODEL_FILE

    given = [b for b in (bundles.split(",") if isinstance(bundles, str) else bundles) if str(b).strip()]
    if not given:
        raise MedfmError("name at least one bundle")
    found = {}  # by folder name, which the tables and the embedding folders use (a bundle may be given as a path)
    for bundle in given:
        located = Bundle.find(bundle)
        if located.root.name in found:
            raise MedfmError(f"{bundle}: a bundle in a folder named {located.root.name} is already in the probe; "
                             "probe each once (rename a copy's folder to compare it)")
        found[located.root.name] = located
    names = list(found)
    labelled = read_label_table(table, task, label_column, group_column)
    splits = probe_splits(labelled, folds, repeats, fractions, seed)
    out_dir = Path(out).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise MedfmError(f"{out_dir}: exists and is not a folder")
    record = {"command": list(command) if command is not None else None, "table": str(labelled.source),
              "table_sha256": hashlib.sha256(labelled.source.read_bytes()).hexdigest(), "task": task,
              "fractions": sorted(float(f) for f in fractions), "folds": folds, "repeats": repeats, "seed": seed,
              "group_column": group_column, "label_column": label_column, "classes": labelled.classes,
              "regions": "whole scans" if labelled.points is None else
              f"points (x, y, z mm, LPS): the bundles' region crops; intensity baseline a {POINT_REGION_MM:g} mm cube",
              "versions": {"medfm": __version__, "torch": torch.__version__, "scikit-learn": sklearn.__version__,
                           "numpy": np.__version__, "python": sys.version.split()[0]},
              "bundles": {name: {"folder": str(b.root), "version": b.metadata.get("version")} for name, b in found.items()},
              "warnings": []}
    matrices: dict[tuple[str, str], np.ndarray] = {}
    points_file = None if labelled.points is None else _points_file(labelled, out_dir / "embeddings")
    permuted_of = {}
    for name in names:
        bundle_dir = found[name].root
        has_weights = (bundle_dir / MODEL_FILE).is_file()
        if not has_weights:
            print(f"medfm: warning: {name} has no weights installed ({bundle_dir / MODEL_FILE}), so it gets no "
                  f"'pretrained' rows: only its baselines run, and its permuted control shuffles the random_init "
                  f"features. For its weights: {how_to_get_weights(bundle_dir)}", file=sys.stderr)
        permuted_of[name] = record["bundles"][name]["permuted_control_of"] = "pretrained" if has_weights else "random_init"
        feature_sets = [("pretrained", True), ("random_init", False)] if has_weights else [("random_init", False)]
        for features, pretrained in feature_sets:
            folder = out_dir / "embeddings" / name / (features if pretrained else f"{features}_seed{seed}")
            with warnings_collected(record["warnings"]):  # modality, spacing, contract: what the reader should weigh
                matrix, weights = _embedding_matrix(str(bundle_dir), labelled, folder, pretrained, seed, progress,
                                                    points_file)
            matrices[(name, features)] = matrix
            record["bundles"][name][f"{features}_weights"] = weights
    histogram = "histogram.npz" if labelled.points is None else f"histogram_points_{POINT_REGION_MM:g}mm.npz"
    matrices[("-", "histogram")] = intensity_features(labelled, out_dir / "embeddings" / histogram, progress)
    permuted = {repeat: np.random.default_rng([seed, repeat, 7]).permutation(labelled.labels)
                for repeat in range(repeats)}
    jobs = [(bundle, features, kind) for (bundle, features) in matrices for kind in PROBES[task]]
    jobs += [(name, "permuted", kind) for name in names for kind in PROBES[task]]
    fold_rows = []
    num_classes = len(labelled.classes) if labelled.classes else None
    bar = tqdm(total=len(jobs) * len(splits), desc="probes", unit="fit", disable=not progress)
    for bundle, features, kind in jobs:
        matrix = matrices[(bundle, permuted_of[bundle] if features == "permuted" else features)]
        for split in splits:
            labels = permuted[split.repeat] if features == "permuted" else labelled.labels
            scores = score_probe(matrix, labels, labelled.groups, split, task, kind, num_classes)
            for metric in METRICS[task]:
                fold_rows.append({"bundle": bundle, "features": features, "probe": kind, "fraction": split.fraction,
                                  "repeat": split.repeat, "fold": split.fold, "n_train": len(split.train),
                                  "n_test": len(split.test), "metric": metric, "value": scores[metric]})
            bar.update()
    bar.close()
    summary = _summary_rows(fold_rows)
    _write_csv(out_dir / "probe_folds.csv", FOLD_COLUMNS, fold_rows)
    _write_csv(out_dir / "probe_summary.csv", SUMMARY_COLUMNS, summary)
    _write_markdown(out_dir / "probe.md", summary, task, labelled, group_column, permuted_of)
    _write_plot(out_dir / "probe.png", summary, task)
    with atomic_path(out_dir / "probe_record.json") as temporary:
        temporary.write_text(json.dumps(record, indent=2) + "\n")
    return summary
