"""MONAI-Label-ready segmentation bundles made from a medfm bundle's pretrained network.

A foundation bundle's own inference restores or embeds; MONAI Label needs a segmentation
network whose labels are in the metadata, an ``inference.json`` with ``network_def`` /
``preprocessing`` / ``inferer`` / ``postprocessing`` and a ``train.json`` its Train button runs.
:func:`make_label_bundle` writes such a bundle from the source bundle's segmentation fine-tuning
config (named by ``segmentation_config`` in its metadata): the same network, transforms and
inferer, an output head for the given labels, and ``models/model.pt`` holding the source's
pretrained weights with a fresh head. Every config is one self-contained JSON file, because
MONAI Label reads exactly ``configs/inference.json`` and ``configs/train.json``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from . import __version__
from .bundles import find_bundle
from .errors import MedfmError
from .weights import installed_weights_id
from .weights.records import MODEL_FILE, PROVENANCE_FILE, ImportReport, sha256_of
from .workflows.handlers import PretrainedWeightsLoader

__all__ = ["make_label_bundle", "parse_labels"]

#: Files copied unchanged from the source bundle.
COPIED = ("configs/logging.conf", "configs/multi_gpu_train.json", "LICENSE")
#: Per-key arguments of dictionary transforms, dropped with the ``label`` key for inference.
PER_KEY_ARGUMENTS = ("mode", "padding_mode", "align_corners", "dtype")
#: Train-config sections that inference does not need.
TRAINING_ONLY = ("train", "validate", "loss", "optimizer", "prepare_batch", "initialize", "run", "finalize")


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


def _train_config(source: dict, names: list[str]) -> dict:
    """The source segmentation config made to train in place: checkpoints go to ``models/``."""
    config = copy.deepcopy(source)
    config.update({
        "label_names": {str(index): name for index, name in enumerate(["background", *names])},
        "num_classes": len(names) + 1,
        "output_dir": "$@bundle_root + '/train'",
        "ckpt_dir": "$@bundle_root + '/models'",
        "pretrained_path": "$@bundle_root + '/models/model.pt'",
        # annotators' datasets are small: validate, and keep the best model, every epoch
        "val_interval": 1,
    })
    handlers = config["train"]["handlers"]
    handlers[0] = {"_target_": "CheckpointLoader", "_disabled_": "$not @pretrained", "load_path": "@pretrained_path",
                   "load_dict": {"model": "@network"}, "map_location": "@device", "strict": True}
    # MONAI Label may hold out nothing from a handful of labelled scans; then validate on the training scans
    config["validate"]["dataloader"]["dataset"] = (
        "$@validate#dataset if len(@validate#dataset) > 0 else "
        "monai.data.Dataset(@train#dataset#data, @validate#preprocessing)")
    return config


def _inference_config(train: dict) -> dict:
    """Segmentation inference for one scan: the validation transforms and inferer of ``train``."""
    config = {key: value for key, value in train.items() if key not in TRAINING_ONLY}
    preprocessing = copy.deepcopy(train["validate"]["preprocessing"])
    preprocessing["transforms"] = [_image_only(t) for t in preprocessing["transforms"]]
    config.update({
        "output_dir": "$@bundle_root + '/eval'",
        "input_image": "",
        "datalist": "$[{'image': @input_image}]",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "network": "$@network_def.to(@device)",
        "preprocessing": preprocessing,
        "inferer": copy.deepcopy(train["validate"]["inferer"]),
        # MONAI Label runs "postprocessing" and returns the label itself; the bundle's own runs also save it
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
                 "nearest_interp": True, "to_tensor": True},
            ],
        },
        "dicom_seg": True,
        "save_segmentation": {"_target_": "medfm.io.SaveSegmentationd", "keys": "pred", "output_dir": "@output_dir",
                              "labels": "@label_names", "source_key": "image", "postfix": "seg",
                              "dicom_seg": "@dicom_seg", "algorithm": "$medfm.bundles.bundle_name(@bundle_root)"},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0, "pin_memory": "@pin_memory"},
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "@ckpt_path", "load_dict": {"model": "@network"},
             "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer",
                      "postprocessing": "$monai.transforms.Compose([@postprocessing, @save_segmentation])",
                      "val_handlers": "@handlers"},
        "initialize": ["$medfm.engines.seed_process(0, deterministic=False)"],
        "run": ["$@evaluator.run()"],
        "finalize": [],
    })
    if "prepare_batch" in train:
        config["prepare_batch"] = copy.deepcopy(train["prepare_batch"]) | {"label_key": None}
        config["evaluator"]["prepare_batch"] = "@prepare_batch"
    return config


def _metadata(source: dict, train: dict, names: list[str], name: str, source_weights: str) -> dict:
    metadata = copy.deepcopy(source)
    metadata.pop("segmentation_config", None)
    channels = {str(index): label for index, label in enumerate(["background", *names])}
    patch = train.get("patch_size")
    image = metadata["network_data_format"]["inputs"]["image"]
    if isinstance(patch, list):
        image["spatial_shape"] = patch
    metadata.update({
        "name": name,
        "version": source["version"],
        "changelog": {source["version"]: f"made by medfm {__version__} label-bundle from {source['name']} "
                                         f"{source['version']} (weights: {source_weights})"},
        "task": f"Segmentation of {', '.join(names)} for MONAI Label, fine-tuned from {source['name']}",
        "description": (f"{source['name_of_model']} with a fresh {len(names) + 1}-channel segmentation head "
                        f"({', '.join(channels.values())}). Inference segments one scan in its own geometry; "
                        "train fine-tunes on the annotators' labels and keeps the best model in models/model.pt."),
        "label_classes": "; ".join(f"{index}: {label}" for index, label in channels.items()),
        "pred_classes": "; ".join(f"{index}: {label}" for index, label in channels.items()),
        "eval_metrics": {},
        "label_bundle": {"source_bundle": source["name"], "source_version": source["version"],
                         "source_weights": source_weights, "labels": names},
    })
    metadata["network_data_format"]["outputs"] = {"pred": {
        "type": "image", "format": "segmentation", "num_channels": len(channels), "spatial_shape": image["spatial_shape"],
        "dtype": "float32", "value_range": [0, 1], "is_patch_data": bool(image.get("is_patch_data", True)),
        "channel_def": channels,
    }}
    return metadata


def _readme(metadata: dict, report: dict | None, source_dir: Path) -> str:
    info = metadata["label_bundle"]
    labels = ", ".join(f"{index}: {label}" for index, label in metadata["network_data_format"]["outputs"]["pred"]["channel_def"].items())
    loaded = (f"{len(report['loaded'])} tensors from `{info['source_weights']}`; fresh: {', '.join(report['shape_differs'] + report['missing']) or 'none'}"
              if report else "none (started from scratch with --pretrained False)")
    return f"""# {metadata['name']}: {', '.join(info['labels'])} segmentation for MONAI Label

Made by `medfm label-bundle` (medfm {__version__}) from `{info['source_bundle']}` {info['source_version']}.
Network and preprocessing are that bundle's segmentation fine-tuning setup ({metadata['name_of_model']});
the output head is new, for the labels {labels}.

- `models/model.pt`: the source weights in the backbone ({loaded}). Its predictions mean nothing
  until it has been trained on some labelled scans: label a few in MONAI Label, press Train, and
  each finished run replaces this file with its best validation model.
- Weights licence: the source bundle's weights licence applies to this file and to everything trained
  from it; see `{source_dir / 'docs' / 'README.md'}` (and `medfm info {info['source_bundle']}`).
- Code licence: `LICENSE` (Apache-2.0).

Serving, training and the DICOMweb route are described in medfm's `docs/monailabel.md`. Without MONAI Label:

```bash
python -m monai.bundle run --config_file configs/inference.json --bundle_root . --input_image scan.nii.gz
python -m monai.bundle run --config_file configs/train.json --bundle_root . --dataset_dir /data/Task
```
"""


def make_label_bundle(bundle: str | os.PathLike, labels: str | list[str] | tuple[str, ...], out: str | os.PathLike,
                      pretrained: bool = True, force: bool = False) -> Path:
    """Write a MONAI-Label-ready segmentation bundle for ``labels`` to ``out`` and return its path.

    Args:
        bundle: medfm bundle name or folder whose metadata names a ``segmentation_config``.
        labels: structure names (channel 0 is background).
        out: the new bundle's folder; its name is the model name MONAI Label shows.
        pretrained: load the source bundle's installed weights (``models/model.pt``) into the
            backbone; an error when it has none. ``False`` starts from scratch.
        force: replace an existing ``out``.

    The bundle appears at ``out`` only when complete (built beside it, then renamed).
    """
    source_dir = find_bundle(bundle)
    names = parse_labels(labels)
    target = Path(out).expanduser().resolve()
    if target.exists() and not force:
        raise MedfmError(f"{target}: already exists (pass --force to replace it)")
    source_meta = json.loads((source_dir / "configs" / "metadata.json").read_text())
    segmentation_config = source_meta.get("segmentation_config")
    if not segmentation_config:
        raise MedfmError(f"{source_meta.get('name', source_dir.name)}: its network has no segmentation head, so it cannot "
                         "make a label bundle (bundles that can: those whose metadata has segmentation_config)")
    source_weights = source_dir / "models" / "model.pt"
    if pretrained and not source_weights.is_file():
        raise MedfmError(f"{source_dir.name}: no weights installed ({source_weights} missing); run `medfm weights "
                         f"fetch {source_dir.name}` (or `medfm weights import`) first, or pass --pretrained False")
    parser = ConfigParser()
    parser.read_config(str(source_dir / segmentation_config))
    train = _train_config(parser.config, names)
    source_sha256 = sha256_of(source_weights) if pretrained else None
    weights_id = installed_weights_id(source_dir, source_sha256) if pretrained else "none"
    metadata = _metadata(source_meta, train, names, target.name, weights_id)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for relative in COPIED:
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source_dir / relative, staging / relative)
        for relative, content in (("configs/train.json", train), ("configs/inference.json", _inference_config(train)),
                                  ("configs/metadata.json", metadata)):
            ConfigParser.export_config_file(content, str(staging / relative), indent=4)
        network = ConfigParser(train).get_parsed_content("network_def")
        report = PretrainedWeightsLoader(source_weights, network)() if pretrained else None
        (staging / "models").mkdir()
        torch.save(network.state_dict(), staging / MODEL_FILE)
        if report is not None:  # the backbone's weights, imported with a fresh head: the import record's format
            record = ImportReport(
                source=str(source_weights), source_sha256=source_sha256, weights=weights_id, output=str(target / MODEL_FILE),
                output_sha256=sha256_of(staging / MODEL_FILE), dtype="float32", in_channels=getattr(network, "in_channels", None),
                missing_keys=report["shape_differs"] + report["missing"],
                imported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            record.write(staging / PROVENANCE_FILE)
        (staging / "docs").mkdir()
        (staging / "docs" / "README.md").write_text(_readme(metadata, report, source_dir))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
