"""Task bundles: a foundation bundle's network fine-tuned for one task, packaged as a self-contained MONAI bundle.

A foundation bundle restores or embeds; what a researcher fine-tunes from it segments, classifies
or regresses. :func:`make_task_bundle` writes that model as a bundle of its own, from the source
bundle's fine-tuning config for the task (named in its metadata's ``fine_tuning_configs``):

- ``configs/inference.json``: the fine-tuning's validation transforms and inferer, and a
  :class:`~medfm.workflows.CohortRunner` that segments (NIfTI, DICOM-SEG, statistics) or predicts
  (``predictions.csv``) any number of inputs; ``network_def`` / ``preprocessing`` / ``inferer`` /
  ``postprocessing`` are what MONAI Label reads;
- ``configs/train.json``: the fine-tuning config, made to continue training the bundle's own weights;
- ``configs/embed.json``: the source's embedding workflow on the fine-tuned network (``medfm embed``, ``medfm probe``);
- ``configs/metadata.json``: the task, the labels or classes, ``network_data_format``, the source's input
  contract, and provenance (source bundle and weights, training data fingerprint, validation metrics);
- ``models/model.pt`` and its import record, and ``docs/README.md``, a model card written from the metadata.

The weights come from a fine-tuning run (:func:`read_fine_tuning_record`: ``medfm finetune``, or a run of
``python -m monai.bundle run`` packaged with ``--from``), or are the source's pretrained backbone with a
fresh head (``medfm label-bundle``: a segmentation bundle for MONAI Label to train). Every config is one
self-contained JSON file, because MONAI Label reads exactly ``configs/inference.json`` and ``configs/train.json``.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .bundles import Bundle
from .errors import MedfmError

__all__ = ["TASKS", "FineTuning", "fine_tuning_config", "finetune", "make_label_bundle", "make_task_bundle", "parse_labels",
           "read_fine_tuning_record"]

TASKS = ("segmentation", "classification", "regression")
#: Files copied unchanged from the source bundle.
COPIED = ("configs/logging.conf", "configs/multi_gpu_train.json", "LICENSE")
#: Per-key arguments of dictionary transforms, dropped with the ``label`` key for inference.
PER_KEY_ARGUMENTS = ("mode", "padding_mode", "align_corners", "dtype")
#: Train-config sections that inference does not need.
TRAINING_ONLY = ("train", "validate", "loss", "optimizer", "prepare_batch", "initialize", "run", "finalize")
#: The model zoo's list of downloadable weights: a task bundle's own weights are nowhere to download yet.
LARGE_FILES = """\
# models/model.pt holds weights made for this bundle (docs/README.md names the source weights and their licence,
# which applies to them). medfm release packs them only when asked (--own_weights True) and the source weights
# allow it; to host them elsewhere, list them here (path, url, hash_val, hash_type: sha256) for
# python -m monai.bundle download_large_files.
large_files: []
"""


@dataclass
class FineTuning:
    """What a task bundle is made from.

    ``labels``: segmentation: ``{"0": "background", "1": name, ...}``; classification: the class names in
    the network's output order; regression: ``[target name]``. ``checkpoint``: the fine-tuned weights, or None
    for the source's pretrained backbone with a fresh head. ``settings``: top-level config values the network
    and preprocessing were built with. The rest is provenance, as :class:`~medfm.workflows.FineTuningRecord` wrote it.
    """

    task: str
    labels: dict | list
    checkpoint: Path | None = None
    settings: dict = field(default_factory=dict)
    training_data: dict | None = None
    key_metric: str | None = None
    metrics: dict = field(default_factory=dict)
    epoch: int | None = None
    source_weights: dict | None = None

    @property
    def names(self) -> list[str]:
        """The output names: foreground labels for segmentation, classes, or the regression target."""
        if self.task == "segmentation":
            return [name for value, name in sorted(self.labels.items(), key=lambda item: int(item[0])) if int(value) != 0]
        return list(self.labels)


def parse_labels(labels: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"liver,spleen"`` (or a sequence) -> ``["liver", "spleen"]``; names must be unique and not ``background``."""
    names = [name.strip() for name in (labels.split(",") if isinstance(labels, str) else labels)]
    if not names or any(not name for name in names):
        raise MedfmError(f"--labels needs comma-separated label names, got {labels!r}")
    if any(name.lower() == "background" for name in names):
        raise MedfmError("--labels: 'background' is channel 0 of every label bundle; list only the structures")
    if len({name.lower() for name in names}) != len(names):
        raise MedfmError(f"--labels: names repeat: {names}")
    return names


def fine_tuning_config(source: Bundle, task: str | None) -> tuple[str, str]:
    """``(task, config path relative to the bundle)``: the source's fine-tuning config for ``task`` (default: its first)."""
    configs, name, source_dir = source.fine_tuning_configs, source.name, source.root
    if not configs:
        raise MedfmError(f"{name}: its metadata names no fine-tuning configs (fine_tuning_configs), so it cannot make a task bundle")
    if task is None:
        task = next(iter(configs))
    if task not in configs:
        raise MedfmError(f"{name}: cannot fine-tune for {task!r}; its fine-tuning tasks are {', '.join(configs)}")
    if not (source_dir / configs[task]).is_file():
        raise MedfmError(f"{source_dir}: {configs[task]} (its {task} fine-tuning config) is missing")
    return task, configs[task]


def read_fine_tuning_record(run_dir: str | os.PathLike) -> FineTuning:
    """The fine-tuning run in ``run_dir`` (its ``output_dir``): the record its ``FineTuningRecord`` handler wrote and
    the checkpoint ``models/model.pt``. Every field is checked: one line names the file and what is wrong."""
    from .workflows.handlers import FINE_TUNING_RECORD

    run_dir = Path(run_dir).expanduser().resolve()
    record_file, checkpoint = run_dir / FINE_TUNING_RECORD, run_dir / "models" / "model.pt"
    if not record_file.is_file():
        raise MedfmError(f"{run_dir}: no {FINE_TUNING_RECORD}; give the output_dir of a fine-tuning run of a medfm "
                         "bundle config that validated at least once")
    if not checkpoint.is_file():
        raise MedfmError(f"{run_dir}: no models/model.pt (the run saved no checkpoint)")
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise MedfmError(f"{record_file}: not readable JSON ({error})") from None

    def field_of(key: str, kind: type | tuple[type, ...], required: bool = True):
        value = record.get(key) if isinstance(record, dict) else None
        if value is None and not required:
            return None
        if not isinstance(value, kind):
            raise MedfmError(f"{record_file}: field {key!r} is missing or not a {getattr(kind, '__name__', kind)}")
        return value

    task = field_of("task", str)
    if task not in TASKS:
        raise MedfmError(f"{record_file}: task {task!r} is not one of {', '.join(TASKS)}")
    labels = field_of("labels", (dict, list))
    if task == "segmentation":
        if not isinstance(labels, dict) or not all(str(k).isdigit() and isinstance(v, str) for k, v in labels.items()):
            raise MedfmError(f"{record_file}: segmentation labels must map label values to names, got {labels!r}")
        labels = {str(int(k)): v for k, v in labels.items()}
    elif not isinstance(labels, list) or not labels or not all(isinstance(v, str) and v for v in labels):
        raise MedfmError(f"{record_file}: {task} labels must be a list of names, got {labels!r}")
    metrics = field_of("metrics", dict, required=False) or {}
    return FineTuning(task=task, labels=labels, checkpoint=checkpoint, settings=field_of("settings", dict),
                      training_data=field_of("training_data", dict, required=False),
                      key_metric=field_of("key_metric", str, required=False),
                      metrics={str(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                      epoch=field_of("epoch", int, required=False),
                      source_weights=field_of("source_weights", dict, required=False))


def _image_only(transform: dict) -> dict:
    """A copy of a dictionary transform with the ``label`` key (and its per-key arguments) removed."""
    keys = transform.get("keys")
    if not isinstance(keys, list) or "label" not in keys:
        return transform
    position = keys.index("label")
    result = dict(transform, keys=[key for key in keys if key != "label"])
    for name in PER_KEY_ARGUMENTS:
        value = transform.get(name)
        if isinstance(value, list) and len(value) == len(keys):
            result[name] = [item for index, item in enumerate(value) if index != position]
    return result


def _is_random(transform: Mapping) -> bool:
    """Whether a config's transform is a random (augmentation) transform, from its ``_target_`` class."""
    from monai.bundle.config_item import ComponentLocator
    from monai.transforms import Randomizable

    target = str(transform.get("_target_", ""))
    module, _, name = target.rpartition(".")
    if not module:
        found = ComponentLocator().get_component_module_name(name)
        module = found[0] if isinstance(found, list) else found
    component = getattr(importlib.import_module(module), name, None) if module else None
    return isinstance(component, type) and issubclass(component, Randomizable)


def _inference_preprocessing(train: dict) -> dict:
    """The fine-tuning's validation transforms, image only; where validation takes the training transforms less
    the random ones (an expression), that list written out."""
    transforms = train["validate"]["preprocessing"]["transforms"]
    if not isinstance(transforms, list):
        transforms = [t for t in train["train"]["preprocessing"]["transforms"] if not _is_random(t)]
    return {"_target_": "Compose", "transforms": [_image_only(t) for t in copy.deepcopy(transforms)]}


def _train_config(source: dict, fine_tuning: FineTuning) -> dict:
    """The source's fine-tuning config with the run's settings and labels, made to train the bundle's own weights
    further: they load strictly, checkpoints go to ``models/``."""
    config = copy.deepcopy(source)
    config.update(copy.deepcopy(fine_tuning.settings))
    if fine_tuning.task == "segmentation":
        config["label_names"] = dict(fine_tuning.labels)
    elif fine_tuning.task == "classification":
        config["class_names"] = list(fine_tuning.labels)
    config.update({
        "output_dir": "$@bundle_root + '/train'",
        "ckpt_dir": "$@bundle_root + '/models'",
        "pretrained_path": "$@bundle_root + '/models/model.pt'",
        # annotators' datasets are small: validate, and keep the best model, every epoch
        "val_interval": 1,
    })
    handlers = config["train"]["handlers"]
    if handlers[0].get("_target_") != "medfm.workflows.PretrainedWeightsLoader":
        raise MedfmError("the fine-tuning config's first training handler is not its PretrainedWeightsLoader")
    handlers[0] = {"_target_": "CheckpointLoader", "_disabled_": "$not @pretrained", "load_path": "@pretrained_path",
                   "load_dict": {"model": "@network"}, "map_location": "@device", "strict": True}
    # MONAI Label may hold out nothing from a handful of labelled scans; then validate on the training scans
    config["validate"]["dataloader"]["dataset"] = (
        "$@validate#dataset if len(@validate#dataset) > 0 else "
        "monai.data.Dataset(@train#dataset#data, @validate#preprocessing)")
    return config


#: Per task: what turns the network's output for one input into the result, and what writes it.
_POSTPROCESSING = {
    "segmentation": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "nearest_interp": True, "to_tensor": True},
    ],
    "classification": [{"_target_": "Activationsd", "keys": "pred", "softmax": True}],
    "regression": [],
}
_WRITERS = {
    "segmentation": {"_target_": "medfm.workflows.SegmentationWriter", "postprocessing": "@postprocessing",
                     "labels": "@label_names", "dicom_seg": "@dicom_seg", "statistics": "@statistics",
                     "algorithm": "$medfm.bundles.bundle_name(@bundle_root)", "preview": "@preview",
                     "modality": "$medfm.bundles.Bundle.find(@bundle_root).contract.get('modality', '')"},
    "classification": {"_target_": "medfm.workflows.PredictionWriter", "postprocessing": "@postprocessing",
                       "classes": "@label_names"},
    "regression": {"_target_": "medfm.workflows.PredictionWriter", "postprocessing": "@postprocessing", "classes": None},
}


def _inference_config(train: dict, task: str) -> dict:
    """Inference over any number of inputs with the fine-tuning's validation transforms and inferer."""
    config = {key: value for key, value in train.items() if key not in TRAINING_ONLY}
    config.update({
        "output_dir": "$@bundle_root + '/eval'",
        "input_image": "",
        "inputs": "$medfm.io.expand_inputs([@input_image] if @input_image else [])",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "device": "$medfm.workflows.inference_device()",
        "network": "$@network_def.to(@device)",
        "preprocessing": _inference_preprocessing(train),
        "inferer": copy.deepcopy(train["validate"]["inferer"]),
        "postprocessing": {"_target_": "Compose", "transforms": copy.deepcopy(_POSTPROCESSING[task])},
        "progress": True,
        "preview": False,
        "writer": copy.deepcopy(_WRITERS[task]),
        "runner": {"_target_": "medfm.workflows.CohortRunner", "inputs": "@inputs", "preprocessing": "@preprocessing",
                   "network": "@network", "inferer": "@inferer", "writer": "@writer", "output_dir": "@output_dir",
                   "weights_file": "@ckpt_path", "bundle_root": "@bundle_root", "device": "@device",
                   "num_workers": "@num_workers", "progress": "@progress", "amp": "@amp", "preview": "@preview"},
        "initialize": ["$medfm.engines.seed_process(0, deterministic=False)"],
        "run": ["$@runner.run()"],
        "finalize": [],
    })
    if task == "segmentation":
        config.update({"dicom_seg": True, "statistics": False})
    return config


#: Sections of the source's inference.json that its embedding overlay does not use (its workflow, what feeds it).
_SOURCE_INFERENCE_ONLY = ("datalist", "dataset", "dataloader", "postprocessing", "handlers", "evaluator", "input_image",
                          "initialize", "run", "finalize")


def _literal_network_def(train: dict) -> dict:
    """``network_def`` of ``train`` with every argument evaluated: it stands alone, beside keys of other meanings."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(train)
    literal = {"_target_": train["network_def"]["_target_"]}
    for name in train["network_def"]:
        if name.startswith("_"):
            continue
        value = parser.get_parsed_content(f"network_def#{name}")
        literal[name] = list(value) if isinstance(value, tuple) else value
        try:
            json.dumps(literal[name])
        except TypeError:
            raise MedfmError(f"network_def#{name} is a {type(value).__name__}, which a bundle config cannot hold") from None
    return literal


def _embedding_config(source: Bundle, train: dict) -> dict:
    """The source bundle's embedding workflow (its inference keys and ``embed.json``) on the fine-tuned network.

    ``medfm embed TASK`` then writes the vectors ``medfm embed SOURCE`` writes (same preprocessing, windows
    and pooling, every network's ``embed``), from the fine-tuned encoder: the two are comparable side by side.
    It is an overlay on the task's ``inference.json``, as ``embed.json`` is on a foundation bundle's.
    """
    from monai.bundle import ConfigParser

    inference, overlay = ConfigParser(), ConfigParser()
    inference.read_config(str(source.config("inference.json")))
    overlay.read_config(str(source.config("embed.json")))
    config = {key: value for key, value in inference.config.items() if key not in _SOURCE_INFERENCE_ONLY}
    config.update(overlay.config)
    config.update({"network_def": _literal_network_def(train), "ckpt_path": "$@bundle_root + '/models/model.pt'",
                   "embed_inputs": "@inputs"})
    return config


def _output_format(fine_tuning: FineTuning, spatial_shape) -> dict:
    """``network_data_format.outputs.pred`` of the task bundle."""
    if fine_tuning.task == "segmentation":
        channels = {str(value): name for value, name in sorted(fine_tuning.labels.items(), key=lambda item: int(item[0]))}
        return {"type": "image", "format": "segmentation", "num_channels": len(channels), "spatial_shape": spatial_shape,
                "dtype": "float32", "value_range": [0, 1], "is_patch_data": False, "channel_def": channels}
    if fine_tuning.task == "classification":
        channels = {str(index): name for index, name in enumerate(fine_tuning.labels)}
        return {"type": "probabilities", "format": "classes", "num_channels": len(channels), "spatial_shape": [len(channels)],
                "dtype": "float32", "value_range": [0, 1], "is_patch_data": False, "channel_def": channels}
    return {"type": "number", "format": "regression", "num_channels": 1, "spatial_shape": [1], "dtype": "float32",
            "value_range": [], "is_patch_data": False, "channel_def": {"0": fine_tuning.labels[0]}}


def _metadata(source: dict, train: dict, fine_tuning: FineTuning, name: str, provenance: dict) -> dict:
    metadata = copy.deepcopy(source)
    metadata.pop("fine_tuning_configs", None)
    names = fine_tuning.names
    image = metadata["network_data_format"]["inputs"]["image"]
    if isinstance(train.get("patch_size"), list):
        image["spatial_shape"] = train["patch_size"]
    trained = fine_tuning.checkpoint is not None
    what = {"segmentation": f"Segmentation of {', '.join(names)}", "classification": f"Classification into {', '.join(names)}",
            "regression": f"Regression of {names[0]}"}[fine_tuning.task]
    made_by = "finetune" if trained else "label-bundle"
    classes = "; ".join(f"{index}: {label}" for index, label in _output_format(fine_tuning, None)["channel_def"].items())
    metadata.update({
        "name": name,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"made by medfm {__version__} {made_by} from {source['name']} {source['version']} "
                               f"(weights: {provenance['source_weights']})"},
        "task": f"{what}, fine-tuned from {source['name']}" if trained else f"{what} for MONAI Label, to be fine-tuned from {source['name']}",
        "description": (f"{source['name_of_model']} fine-tuned for {fine_tuning.task} ({', '.join(names)}). Inference "
                        f"{'segments' if fine_tuning.task == 'segmentation' else 'predicts'} any number of inputs in their own "
                        "geometry; train continues training on labelled scans and keeps the best model in models/model.pt."
                        if trained else
                        f"{source['name_of_model']} with a fresh {len(names) + 1}-channel segmentation head ({classes}). "
                        "Inference segments scans in their own geometry; train fine-tunes on the annotators' labels and "
                        "keeps the best model in models/model.pt."),
        "label_classes": classes,
        "pred_classes": classes,
        "eval_metrics": dict(fine_tuning.metrics),
        "task_bundle": provenance,
    })
    pred = _output_format(fine_tuning, image["spatial_shape"])
    if fine_tuning.task == "segmentation":  # a segmentation comes in the input's windows, as the input goes in
        pred["is_patch_data"] = bool(image.get("is_patch_data", True))
    metadata["network_data_format"]["outputs"] = {"pred": pred}
    return metadata


def _provenance(source: dict, fine_tuning: FineTuning, source_weights_id: str, source_sha256: str | None) -> dict:
    return {"task": fine_tuning.task, "labels": fine_tuning.names, "source_bundle": source["name"],
            "source_version": source["version"], "source_weights": source_weights_id, "source_sha256": source_sha256,
            "training_data": fine_tuning.training_data, "key_metric": fine_tuning.key_metric,
            "validation_metrics": dict(fine_tuning.metrics), "epoch": fine_tuning.epoch, "settings": fine_tuning.settings}


def _readme(metadata: dict, source_dir: Path, loaded: str) -> str:
    info = metadata["task_bundle"]
    channels = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    outputs = ", ".join(f"{index}: {label}" for index, label in channels.items())
    data = info["training_data"]
    if info["epoch"] is None:
        trained = ("Not trained yet: its predictions mean nothing until it has been trained on labelled scans (label a "
                   "few in MONAI Label and press Train; each finished run replaces `models/model.pt` with its best "
                   "validation model).")
    else:
        metrics = ", ".join(f"{name} {value:.4g}" for name, value in info["validation_metrics"].items()) or "none recorded"
        cases = f"{data['cases']} cases, datalist sha256 {data['sha256'][:16]}..." if data else "not recorded"
        trained = (f"Fine-tuned on {cases}. The saved checkpoint is from epoch {info['epoch']}, validation: {metrics} "
                   f"(key metric {info['key_metric']}). These are numbers on the user's own held-out cases, not a "
                   "benchmark.")
    return f"""# {metadata['name']}: {metadata['task']}

Made by medfm {__version__} from `{info['source_bundle']}` {info['source_version']} ({metadata['name_of_model']}),
its {info['task']} fine-tuning setup: the same network, preprocessing and inferer. Outputs: {outputs}.

## Weights
- `models/model.pt`: {loaded}
- Source weights: `{info['source_weights']}` (sha256 {(info['source_sha256'] or 'none')[:16]}...).
- {trained}
- Licence: the source bundle's weights licence applies to this file and to everything trained from it; see
  `{source_dir / 'docs' / 'README.md'}` (and `medfm info {info['source_bundle']}`). Code licence: `LICENSE` (Apache-2.0).

## Use
Good for: the task above on inputs like its training data, within the source bundle's input contract
(`medfm info {metadata['name']}`). Research only; not a medical device.

```bash
medfm infer {metadata['name']} scan.nii.gz more_scans/ list.csv --out results{' --statistics' if info['task'] == 'segmentation' else ''}
python -m monai.bundle run --config_file configs/inference.json --bundle_root . --input_image scan.nii.gz
python -m monai.bundle run --config_file configs/train.json --bundle_root . --dataset_dir /data/Task
medfm embed {metadata['name']} scans.csv --out embeddings   # the fine-tuned encoder, as `medfm embed {info['source_bundle']}` embeds
```

`configs/embed.json` (an overlay on `configs/inference.json`) is `{info['source_bundle']}`'s embedding workflow run on
this bundle's network: the same preprocessing, windows and pooling, so its vectors sit beside the source's in
`medfm probe`; they differ by what fine-tuning changed in the encoder (and by its normalisation layers, where
fine-tuning uses running statistics and the source its batch statistics).

Serving and training it in MONAI Label: medfm's `docs/monailabel.md`.
"""


def make_task_bundle(bundle: str | os.PathLike, out: str | os.PathLike, fine_tuning: FineTuning, pretrained: bool = True,
                     force: bool = False, network_overrides: Mapping | None = None) -> Path:
    """Write the task bundle for ``fine_tuning`` of ``bundle`` to ``out`` and return its path.

    Args:
        bundle: the source (foundation) bundle, name or folder.
        out: the new bundle's folder; its name is the bundle's name (the model name MONAI Label shows).
        fine_tuning: a run's record (:func:`read_fine_tuning_record`), or a fresh head for labels.
        pretrained: for a fresh head, load the source's installed weights into the backbone (an error when it
            has none); ``False`` starts from scratch. A fine-tuned checkpoint ignores it.
        force: replace an existing ``out``.
        network_overrides: ``network_def#...`` values the run was made with (``--network_def#depth 2``).

    The bundle appears at ``out`` only when complete (built beside it, then renamed).
    """
    import torch
    from monai.bundle import ConfigParser

    from .weights import installed_weights_id
    from .weights.records import MODEL_FILE, PROVENANCE_FILE, ImportReport, sha256_of
    from .workflows.handlers import PretrainedWeightsLoader

    source = Bundle.find(bundle)
    source_dir, source_meta = source.root, source.metadata
    target = Path(out).expanduser().resolve()
    if target.exists() and not force:
        raise MedfmError(f"{target}: already exists (pass --force to replace it)")
    task, config_name = fine_tuning_config(source, fine_tuning.task)
    source_weights = source.weights_file
    trained = fine_tuning.checkpoint is not None
    if not trained and pretrained and not source_weights.is_file():
        raise MedfmError(f"{source_dir.name}: no weights installed ({source_weights} missing); run `medfm weights "
                         f"fetch {source_dir.name}` (or `medfm weights import`) first, or pass --pretrained False")
    parser = ConfigParser()
    parser.read_config(str(source_dir / config_name))
    train = _train_config(parser.config, fine_tuning)
    if network_overrides:
        edited = ConfigParser(train)
        for key, value in network_overrides.items():
            edited[key] = value
        train = edited.config
    if trained:
        recorded = fine_tuning.source_weights or {}
        weights_id, source_sha256 = recorded.get("id") or "none", recorded.get("sha256")
    else:
        source_sha256 = sha256_of(source_weights) if pretrained else None
        weights_id = installed_weights_id(source_dir, source_sha256) if pretrained else "none"
    provenance = _provenance(source_meta, fine_tuning, weights_id, source_sha256)
    metadata = _metadata(source_meta, train, fine_tuning, target.name, provenance)

    network = ConfigParser(train).get_parsed_content("network_def")
    if trained:
        from .weights import load_checkpoint

        try:
            network.load_state_dict(load_checkpoint(fine_tuning.checkpoint), strict=True)
        except RuntimeError as error:
            raise MedfmError(f"{fine_tuning.checkpoint}: does not load into {source_meta['name']}'s {task} network built "
                             f"with the recorded settings ({str(error).splitlines()[0]}); a run with other network "
                             "settings needs them again (e.g. --network_def#depth 2)") from None
        report = {"loaded": list(network.state_dict()), "shape_differs": [], "missing": []}
    else:
        report = PretrainedWeightsLoader(source_weights, network)() if pretrained else None

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for relative in COPIED:
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source_dir / relative, staging / relative)
        for relative, content in (("configs/train.json", train), ("configs/inference.json", _inference_config(train, task)),
                                  ("configs/embed.json", _embedding_config(source, train)), ("configs/metadata.json", metadata)):
            ConfigParser.export_config_file(content, str(staging / relative), indent=4)
        (staging / "models").mkdir()
        torch.save(network.state_dict(), staging / MODEL_FILE)
        if report is not None:  # the import record's format: what medfm info and weights verify read
            origin = fine_tuning.checkpoint if trained else source_weights
            ImportReport(
                source=str(origin), source_sha256=sha256_of(origin), weights=None if trained else weights_id,
                output=str(target / MODEL_FILE), output_sha256=sha256_of(staging / MODEL_FILE), dtype="float32",
                in_channels=getattr(network, "in_channels", None), missing_keys=report["shape_differs"] + report["missing"],
                imported_at=datetime.now(timezone.utc).isoformat(timespec="seconds")).write(staging / PROVENANCE_FILE)
        if trained:
            loaded = f"the fine-tuned weights of `{fine_tuning.checkpoint}`, loaded strictly."
        elif report:
            loaded = (f"{len(report['loaded'])} tensors from `{weights_id}`; fresh: "
                      f"{', '.join(report['shape_differs'] + report['missing']) or 'none'}.")
        else:
            loaded = "random initialisation (made with --pretrained False)."
        (staging / "docs").mkdir()
        (staging / "docs" / "README.md").write_text(_readme(metadata, source_dir, loaded))
        (staging / "large_files.yml").write_text(LARGE_FILES)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def make_label_bundle(bundle: str | os.PathLike, labels: str | Sequence[str], out: str | os.PathLike,
                      pretrained: bool = True, force: bool = False) -> Path:
    """A segmentation task bundle for ``labels`` with a fresh head, for MONAI Label to train (``medfm label-bundle``)."""
    names = parse_labels(labels)
    fresh = FineTuning(task="segmentation", labels={str(index): name for index, name in enumerate(["background", *names])})
    source = Bundle.find(bundle)
    if "segmentation" not in source.fine_tuning_configs:
        raise MedfmError(f"{source.name}: its network has no segmentation head, so it cannot make a label bundle "
                         "(bundles that can: those with a segmentation fine-tuning config)")
    return make_task_bundle(source, out, fresh, pretrained=pretrained, force=force)


def finetune(bundle: str | os.PathLike, out: str | os.PathLike, dataset_dir: str | os.PathLike | None = None,
             task: str | None = None, pretrained: bool = True, run_dir: str | os.PathLike | None = None,
             from_run: str | os.PathLike | None = None, force: bool = False, **overrides) -> Path | None:
    """Fine-tune ``bundle`` for ``task`` on ``dataset_dir`` and package the best checkpoint as the task bundle ``out``.

    The training is the source bundle's own fine-tuning config, run as ``python -m monai.bundle run`` runs it
    (``multi_gpu_train.json`` added under ``torchrun``), with its output in ``run_dir`` (default ``<out>_training``);
    ``resume``, ``amp``, ``accumulate`` and any other key of the config are ``overrides``. With ``from_run`` nothing
    is trained: the run in that folder (a fine-tuning run of a medfm bundle config) is packaged. Keys
    ``network_def#...`` among ``overrides`` also shape the packaged network. Returns the task bundle's path
    (None on the other ranks of a distributed run).
    """
    from monai.bundle import ConfigWorkflow

    from .inference import check_overrides

    source = Bundle.find(bundle)
    source_dir = source.root
    target = Path(out).expanduser().resolve()
    if target.exists() and not force:
        raise MedfmError(f"{target}: already exists (pass --force to replace it)")
    network_overrides = {key: value for key, value in overrides.items() if key.startswith("network_def#")}
    if from_run is not None:
        others = sorted(set(overrides) - set(network_overrides)) + (["--dataset_dir"] if dataset_dir else [])
        if others:
            raise MedfmError(f"--from packages a finished run: nothing is trained, so {', '.join(others)} do not apply "
                             "(only network_def#... settings the run was made with)")
        fine_tuning = read_fine_tuning_record(from_run)
        if task is not None and task != fine_tuning.task:
            raise MedfmError(f"{from_run}: the run fine-tuned for {fine_tuning.task}, not {task}")
        return make_task_bundle(source, target, fine_tuning, force=force, network_overrides=network_overrides)
    if dataset_dir is None:
        raise MedfmError("--dataset_dir names the labelled data to fine-tune on (or --from a finished run to package)")
    task, config = fine_tuning_config(source, task)
    run_dir = Path(run_dir or f"{target}_training").expanduser().resolve()
    from .workflows.handlers import FINE_TUNING_RECORD

    if (run_dir / FINE_TUNING_RECORD).exists() and str(overrides.get("resume", False)) != "True":
        raise MedfmError(f"{run_dir}: holds an earlier fine-tuning run; continue it with --resume True, or give "
                         "another --run_dir")
    settings = {"dataset_dir": str(Path(dataset_dir).expanduser().resolve()), "output_dir": str(run_dir),
                "pretrained": bool(pretrained), **overrides}
    configs = [config.split("/", 1)[1]]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        configs.append("multi_gpu_train.json")
        # the overlay's finalize ends a torchrun worker; this one still packages the model (then the CLI ends it)
        settings["finalize"] = ["$medfm.workflows.end_distributed_run(@train#handlers + @validate#handlers, end_process=False)"]
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(source_dir / config))
    if "task" in parser.config:  # one config for several tasks (the Medical Transformer's classification and regression)
        settings["task"] = task
    check_overrides(source_dir, configs, settings)
    workflow = ConfigWorkflow(config_file=[str(source_dir / "configs" / name) for name in configs],
                              meta_file=str(source_dir / "configs" / "metadata.json"),
                              logging_file=str(source_dir / "configs" / "logging.conf"), workflow_type="train",
                              bundle_root=str(source_dir), **settings)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    return make_task_bundle(source, target, read_fine_tuning_record(run_dir), force=force,
                            network_overrides=network_overrides)
