"""Ignite handlers that the bundle configs attach to MONAI engines."""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.handlers import MetricsSaver

from ..errors import MedfmError, WeightsError
from ..io.atomic import atomic_path
from ..io.segmentation import labels_by_value
from ..weights.checkpoint import load_checkpoint

__all__ = ["CheckTrainingSchedule", "FINE_TUNING_RECORD", "FineTuningRecord", "datalist_fingerprint", "LabelledMetricsSaver", "LossComponentsLogger", "PretrainedWeightsLoader", "TrainingState", "latest_training_state", "require_checkpoint", "stacked_outputs"]

#: File name of the state saved after epoch N: ``training_state_epoch=N.pt``.
TRAINING_STATE_PATTERN = re.compile(r"training_state_epoch=(\d+)\.pt")


class PretrainedWeightsLoader:
    """Load pretrained weights into a network when training starts, keeping new layers fresh.

    Tensors whose name and shape match the network are loaded; the rest (typically a new output
    head with another class count) keep their initial values. What was loaded and skipped is
    logged, and a checkpoint that matches nothing (or less than ``min_fraction`` of the network)
    is an error: fine-tuning must not silently start from scratch.

    (MONAI's ``CheckpointLoader(strict_shape=False)`` loads nothing from a plain state dict while
    logging "Restored all variables" in monai 1.6.1, hence this handler.)

    Args:
        load_path: a plain state dict, or ``{"model": ...}`` / ``{"state_dict": ...}``; read with
            ``weights_only``.
        network: the module to load into (for DDP, pass the wrapped module).
        min_fraction: smallest fraction of the network's tensors that must be loaded.
    """

    def __init__(self, load_path: str | os.PathLike, network: torch.nn.Module, min_fraction: float = 0.5) -> None:
        self.load_path = load_path
        self.network = network
        self.min_fraction = min_fraction
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        if not Path(self.load_path).is_file():  # before any data is read or cached
            raise WeightsError(f"{self.load_path}: no pre-trained weights to start from; {self._how_to_install()}, "
                               "or fine-tune from scratch with --pretrained False")
        engine.add_event_handler(Events.STARTED, self)

    def _how_to_install(self) -> str:
        path = Path(self.load_path).resolve()
        if path.parent.name == "models" and (path.parents[1] / "configs" / "metadata.json").is_file():  # a bundle's own
            from ..weights.importer import how_to_get_weights

            return how_to_get_weights(path.parents[1])
        return "install them"

    def __call__(self, engine: Engine | None = None) -> dict[str, list[str]]:
        checkpoint = load_checkpoint(self.load_path)
        for wrapper in ("model", "state_dict"):
            if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(wrapper), Mapping):
                checkpoint = checkpoint[wrapper]
        own = self.network.state_dict()
        loaded = {k: v for k, v in checkpoint.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
        report = {
            "loaded": list(loaded),
            "shape_differs": [k for k in checkpoint if k in own and k not in loaded],
            "missing": [k for k in own if k not in checkpoint],
            "unexpected": [k for k in checkpoint if k not in own],
        }
        if len(loaded) < max(1, self.min_fraction * len(own)):
            raise WeightsError(f"{self.load_path}: only {len(loaded)} of {len(own)} network tensors match "
                               f"(first unexpected: {report['unexpected'][:3]}); is this the right checkpoint?")
        self.network.load_state_dict(loaded, strict=False)
        self.logger.info(
            f"pretrained weights {self.load_path}: loaded {len(loaded)} of {len(own)} tensors; "
            f"kept fresh (shape differs): {report['shape_differs'] or 'none'}; "
            f"missing: {report['missing'] or 'none'}; unexpected: {report['unexpected'] or 'none'}"
        )
        return report


def latest_training_state(save_dir: str | os.PathLike) -> Path | None:
    """The ``training_state_epoch=N.pt`` in ``save_dir`` with the largest N, or None."""
    found = [(int(match.group(1)), path) for path in Path(save_dir).glob("training_state_epoch=*.pt")
             if (match := TRAINING_STATE_PATTERN.fullmatch(path.name))]
    return max(found)[1] if found else None


class TrainingState:
    """Save everything training needs to continue after each epoch; with ``resume``, continue from it.

    After every epoch (after the other end-of-epoch handlers), rank 0 writes
    ``save_dir/training_state_epoch=N.pt`` holding the state dicts of ``objects`` (network,
    optimizer, learning-rate schedule, ...) and of the trainer (epoch and iteration counts),
    replacing the previous epoch's file. The file is written beside its final name and renamed
    when complete, so a run killed at any moment leaves the last finished epoch intact. With ``resume``, the newest such file is loaded when training starts (after the
    handlers listed before this one, e.g. pretrained weights) and training goes on at the next
    epoch with the optimizer's moments and step counts, and a batch sampler with ``set_epoch``
    draws that epoch's batches; the config's ``max_epochs`` is kept.

    Args:
        save_dir: folder of the training-state files.
        objects: name -> object with ``state_dict`` / ``load_state_dict`` (DDP modules unwrapped).
        resume: continue from the newest file in ``save_dir`` (an error when there is none).
    """

    def __init__(self, save_dir: str | os.PathLike, objects: Mapping[str, object], resume: bool = False) -> None:
        self.save_dir = Path(save_dir)
        self.objects = dict(objects)
        self.resume = resume
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        self.objects["trainer"] = engine
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.STARTED, self._save_after_the_other_handlers)

    def _save_after_the_other_handlers(self, engine: Engine) -> None:
        # registered once every handler is attached, so the saved state includes this epoch's
        # learning-rate step and validation, whichever order the config lists the handlers in
        if not engine.has_event_handler(self.save, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def load(self, engine: Engine) -> None:
        path = latest_training_state(self.save_dir)
        if path is None:
            raise MedfmError(f"{self.save_dir}: nothing to resume from (no training_state_epoch=N.pt there)")
        max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=self.objects, checkpoint=load_checkpoint(path))
        engine.state.max_epochs = max_epochs
        # MONAI moves a DistributedSampler to each epoch itself; a batch sampler that draws per
        # epoch (SPAD's aniso_d groups) would otherwise start the resumed run at its first epoch again
        batch_sampler = getattr(engine.state.dataloader, "batch_sampler", None)
        if callable(getattr(batch_sampler, "set_epoch", None)):
            batch_sampler.set_epoch(engine.state.epoch)
        self.logger.info(f"resumed from {path}: {engine.state.epoch} epochs ({engine.state.iteration} iterations) done")

    def save(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        parallel = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
        state = {name: (item.module if isinstance(item, parallel) else item).state_dict() for name, item in self.objects.items()}
        target = self.save_dir / f"training_state_epoch={engine.state.epoch}.pt"
        with atomic_path(target) as partial:
            torch.save(state, partial)
        for path in self.save_dir.glob("training_state_epoch=*.pt"):
            if path != target:
                path.unlink()


class LossComponentsLogger:
    """Log the epoch means of a loss's ``components`` (a dict of floats it refreshes on each call).

    Each epoch adds one line to the log and, with ``output_file``, one row to a CSV (epoch, then
    one column per component), so multi-task losses can be followed and plotted per task.
    """

    def __init__(self, loss_function: torch.nn.Module, output_file: str | os.PathLike | None = None) -> None:
        self.loss_function = loss_function
        self.output_file = output_file
        self.logger = logging.getLogger(__name__)
        self._sums: dict[str, float] = {}
        self._count = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _accumulate(self, engine: Engine) -> None:
        for name, value in getattr(self.loss_function, "components", {}).items():
            self._sums[name] = self._sums.get(name, 0.0) + value
        self._count += 1

    def _write(self, engine: Engine) -> None:
        if not self._count:
            return
        means = {name: total / self._count for name, total in self._sums.items()}
        self.logger.info("epoch %d: %s", engine.state.epoch, ", ".join(f"{k}={v:.4f}" for k, v in means.items()))
        if self.output_file is not None:
            path = Path(self.output_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            new = not path.exists()
            with open(path, "a", newline="") as stream:
                writer = csv.DictWriter(stream, fieldnames=["epoch", *means])
                if new:
                    writer.writeheader()
                writer.writerow({"epoch": engine.state.epoch, **{k: f"{v:.6g}" for k, v in means.items()}})
        self._sums, self._count = {}, 0


class LabelledMetricsSaver(MetricsSaver):
    """MONAI's ``MetricsSaver`` whose per-class reports name the dataset's labels instead of ``class0``, ``class1``, ...

    After MONAI has written ``<metric>_raw.csv`` (one column per class) and ``<metric>_summary.csv`` (one row per
    class) for each of ``metric_details``, their class names are replaced in place.

    Args:
        save_dir: the reports' folder, as for ``MetricsSaver``.
        labels: the Decathlon ``labels`` mapping (value to name) or the names in value order.
        include_background: whether the metric kept the background channel (value 0), as given to it.
        kwargs: the other ``MetricsSaver`` arguments.
    """

    def __init__(self, save_dir: str, labels: Mapping[int | str, str] | Sequence[str], include_background: bool = False,
                 **kwargs) -> None:
        super().__init__(save_dir, **kwargs)
        foreground = list(labels_by_value(labels).values())
        self.class_names = ["background", *foreground] if include_background else foreground

    def __call__(self, engine: Engine) -> None:
        super().__call__(engine)
        if idist.get_rank() != self.save_rank:
            return
        for metric in self.metric_details or ():
            raw, summary = (Path(self.save_dir) / f"{metric}_{kind}.csv" for kind in ("raw", "summary"))
            if raw.is_file():  # header: filename, class0, class1, ..., mean
                rows = self._read(raw)
                self._write(raw, [self._named(raw, rows[0]), *rows[1:]])
            if summary.is_file():  # rows: class0, ..., mean, each followed by its statistics
                rows = self._read(summary)
                self._write(summary, [rows[0], *([self._named(summary, row[:1])[0], *row[1:]] for row in rows[1:])])

    def _named(self, path: Path, cells: list[str]) -> list[str]:
        renames = {f"class{index}": name for index, name in enumerate(self.class_names)}
        unknown = [cell for cell in cells if re.fullmatch(r"class\d+", cell) and cell not in renames]
        if unknown:
            raise MedfmError(f"{path}: the metric has class {unknown[0]} but the labels name only {len(self.class_names)} "
                             f"({', '.join(self.class_names)}); check include_background")
        return [renames.get(cell, cell) for cell in cells]

    def _read(self, path: Path) -> list[list[str]]:
        with open(path, newline="") as stream:
            return list(csv.reader(stream, delimiter=self.deli))

    def _write(self, path: Path, rows: list[list[str]]) -> None:
        with atomic_path(path) as temporary, open(temporary, "w", newline="") as stream:
            csv.writer(stream, delimiter=self.deli).writerows(rows)


def stacked_outputs(keys: list[str]):
    """An ignite ``output_transform``: the decollated batch's ``keys`` stacked back into tensors.

    MONAI engines decollate outputs into per-item lists (and plain ints for class labels);
    ignite's own metrics (``Accuracy``, ``R2Score``, ...) want one tensor per key.
    """
    from monai.handlers import from_engine

    def transform(output) -> list[torch.Tensor]:
        return [torch.stack([torch.as_tensor(value) for value in values]) for values in from_engine(keys)(output)]

    return transform


class CheckTrainingSchedule:
    """Refuse a training run that would train nothing or save nothing.

    The training loader must yield at least one batch (a batch size above the number of training
    cases with ``drop_last`` yields none, and MONAI then skips the run with only a warning),
    checked when attached; and, when training starts (after :class:`TrainingState` may have
    resumed it, so attach this last), at least one validation, which is where the best
    checkpoint is saved, must fall within the epochs left.

    Args:
        val_interval: validation every this many epochs, as given to MONAI's ``ValidationHandler``.
    """

    def __init__(self, val_interval: int) -> None:
        self.val_interval = int(val_interval)

    def attach(self, engine: Engine) -> None:
        if not engine.state.epoch_length:
            loader = getattr(engine, "data_loader", None)
            dataset = getattr(loader, "dataset", None)
            cases = f"{len(dataset)} training case(s)" if dataset is not None else "the training data"
            drop = " and drop_last" if getattr(loader, "drop_last", False) else ""
            raise MedfmError(f"no training step would run: {cases} with batch size {getattr(loader, 'batch_size', '?')}"
                             f"{drop} give no batch; lower --batch_size or add cases")
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        first, last = engine.state.epoch + 1, engine.state.max_epochs
        if not any(epoch % self.val_interval == 0 for epoch in range(first, last + 1)):
            raise MedfmError(f"no validation would run in epochs {first} to {last} (--val_interval {self.val_interval}), so no "
                             f"checkpoint would be saved; set --val_interval to at most {last} or raise --max_epochs")


def require_checkpoint(path: str | os.PathLike) -> str:
    """``path`` when it is a file; otherwise a one-line error saying that evaluation needs a fine-tuned checkpoint."""
    if not Path(path).is_file():
        raise MedfmError(f"{path}: no fine-tuned checkpoint to evaluate; run configs/train.json with the same "
                         "--output_dir first (it saves the best validation epoch there)")
    return str(path)


#: What a fine-tuning run records beside its checkpoint (``<output_dir>/fine_tuning.json``).
FINE_TUNING_RECORD = "fine_tuning.json"


def datalist_fingerprint(datalist: Sequence[Mapping]) -> str:
    """sha256 of the sorted datalist (its entries as canonical JSON): which cases, with which targets, trained a model."""
    import hashlib
    import json

    def plain(value):
        if isinstance(value, (torch.Tensor, np.ndarray)):
            return np.asarray(value).tolist()
        return value if isinstance(value, (int, float, bool, type(None))) else str(value)

    entries = sorted(json.dumps({str(k): plain(v) for k, v in item.items()}, sort_keys=True) for item in datalist)
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


class FineTuningRecord:
    """Write ``<output_dir>/fine_tuning.json`` each time validation finds a new best key metric, that is each time
    ``CheckpointSaver`` (``save_key_metric``) replaces ``model.pt``: what ``medfm finetune --from`` needs to package
    the run as a task bundle.

    Attach it to the validation evaluator; under DDP, rank 0 writes (as ``CheckpointSaver`` does). The record holds the task, the label or class names, the
    ``settings`` the network and preprocessing were built with (the config's top-level values), the training
    data's fingerprint (:func:`datalist_fingerprint`) and size, the validation metrics and epoch of the saved
    checkpoint, and the pretrained weights fine-tuned from (path, sha256 and id) or none.
    """

    def __init__(self, output_dir: str | os.PathLike, task: str, labels: Mapping | Sequence, datalist: Sequence[Mapping],
                 settings: Mapping, bundle_root: str | os.PathLike, pretrained_path: str | os.PathLike | None = None,
                 pretrained: bool = True) -> None:
        self.path = Path(output_dir) / FINE_TUNING_RECORD
        self.task = task
        self.labels = labels
        self.datalist = datalist
        self.settings = dict(settings)
        self.bundle_root = Path(bundle_root)
        self.pretrained_path = Path(pretrained_path) if pretrained and pretrained_path else None
        self.source: dict | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _source_weights(self) -> dict | None:
        from ..bundles import bundle_name
        from ..weights.records import checkpoint_weights_id

        if self.pretrained_path is None:
            return None
        weights_id, digest = checkpoint_weights_id(self.bundle_root, self.pretrained_path)
        return {"path": str(self.pretrained_path.resolve()), "sha256": digest, "id": weights_id,
                "bundle": bundle_name(self.bundle_root)}

    def __call__(self, engine: Engine) -> None:
        import json

        if engine.state.best_metric_epoch != engine.state.epoch or idist.get_rank() != 0:  # model.pt was not replaced
            return
        if self.source is None:
            self.source = self._source_weights() or {}
        labels = dict(self.labels) if isinstance(self.labels, Mapping) else [str(name) for name in self.labels]
        record = {
            "task": self.task, "labels": labels, "settings": self.settings,
            "training_data": {"cases": len(self.datalist), "sha256": datalist_fingerprint(self.datalist)},
            "key_metric": engine.state.key_metric_name,
            "metrics": {name: float(value) for name, value in engine.state.metrics.items() if np.ndim(value) == 0},
            "epoch": int(engine.state.epoch), "source_weights": self.source or None,
        }
        with atomic_path(self.path) as temporary:
            temporary.write_text(json.dumps(record, indent=2, default=_json_value))


def _json_value(value):
    """Settings may hold tuples, numpy numbers or arrays: JSON gets plain lists and numbers."""
    return np.asarray(value).tolist()
