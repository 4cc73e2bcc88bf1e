"""Import a checkpoint (upstream or our own) into a bundle's ``models/model.pt``."""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import torch

from ..bundles import bundle_config, bundle_name, bundle_network, cache_dir, find_bundle
from ..errors import MedfmError, WeightsError
from . import registry
from .checkpoint import load_checkpoint, save_state_dict
from .download import download
from .records import MODEL_FILE, PROVENANCE_FILE, ImportReport, identify_weights, read_provenance, sha256_of

__all__ = ["fetch_weights", "import_weights", "installed_weights_path", "verify_bundle_weights"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _network_module(bundle_name: str):
    entries = registry.for_bundle(bundle_name)
    if not entries:
        raise WeightsError(f"no weights are registered for bundle {bundle_name!r}, so no importer is known")
    return entries[0].network_code()


def _stage_target(bundle_dir: Path, stage: str, overrides: dict) -> tuple[torch.nn.Module, Path]:
    """The network of pre-training stage ``stage`` (``configs/pretrain.json`` with its overlay
    ``configs/pretrain_<stage>.json``) and the file that stage's weights are read from
    (the config's ``<stage>_path``)."""
    overlay = f"pretrain_{stage}.json"
    if not (bundle_dir / "configs" / overlay).is_file():
        stages = sorted(p.stem.removeprefix("pretrain_") for p in (bundle_dir / "configs").glob("pretrain_*.json"))
        raise WeightsError(f"{bundle_dir}: no pre-training stage {stage!r} (no configs/{overlay}); "
                           f"stages with their own weights: {', '.join(stages) or 'none'}")
    parser = bundle_config(bundle_dir, ["pretrain.json", overlay])
    for key, value in overrides.items():
        parser[f"network_def#{key}"] = value
    return parser.get_parsed_content("network_def"), Path(parser.get_parsed_content(f"{stage}_path"))


def import_weights(bundle: str | os.PathLike, checkpoint_file: str | os.PathLike, weights: str | None = None,
                   in_channels: int | None = None, dtype: str = "float32", strict: bool = True,
                   strip_objects: bool = False, stage: str | None = None) -> ImportReport:
    """Convert ``checkpoint_file`` with the network's ``checkpoint_filter_fn`` and write ``models/model.pt``.

    ``stage`` imports the weights of a pre-training stage's own network instead (SPAD-ViT's
    ``"tokenizer"``: the authors' tokenizer file, written where ``configs/pretrain.json`` reads
    it, ``pretrain/models/tokenizer.pt``), converted by that network's ``checkpoint_filter_fn``.

    The file is read with ``weights_only`` (never unpickled). Its sha256 is compared with the
    registry: a file named like a registered checkpoint, or imported as ``weights``, must match
    that entry's hash. Input channels are adapted to the bundle network's (or ``in_channels``).
    With ``strict``, any missing or unexpected key is an error and nothing is written.
    ``strip_objects`` reads a file that pickles objects beyond tensors by dropping them (see
    :func:`medfm.weights.load_checkpoint`).
    """
    bundle_dir = find_bundle(bundle)
    if dtype not in DTYPES:
        raise WeightsError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    source = Path(checkpoint_file)
    if not source.is_file():
        raise WeightsError(f"{source}: no such file")
    digest = sha256_of(source)
    named_like = [] if stage else registry.for_bundle(bundle_name(bundle_dir))
    expected = registry.get(weights) if weights else next(
        (e for e in named_like if e.file_name == source.name != MODEL_FILE.name), None)
    if expected is not None and expected.sha256 is not None and not expected.matches(digest):
        raise WeightsError(f"{source}: sha256 {digest} does not match registered weights "
                           f"{expected.name!r} ({expected.sha256}); refusing to import a corrupted or different file")
    matched = expected or registry.match_sha256(digest)

    overrides = {"in_channels": in_channels} if in_channels is not None else {}
    if stage:
        network, target_file = _stage_target(bundle_dir, stage, overrides)
        filter_fn = sys.modules[type(network).__module__].checkpoint_filter_fn
    else:
        network, target_file = bundle_network(bundle_dir, **overrides), bundle_dir / MODEL_FILE
        filter_fn = _network_module(bundle_name(bundle_dir)).checkpoint_filter_fn
    try:
        state = filter_fn(load_checkpoint(source, strip_objects=strip_objects), network)
    except ValueError as error:
        raise WeightsError(f"{source}: {error}") from None
    try:
        result = network.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatch
        raise WeightsError(f"{source}: does not fit the bundle network: {str(error).splitlines()[-1].strip()}") from None
    if strict and (result.missing_keys or result.unexpected_keys):
        raise WeightsError(f"{source}: keys do not match the bundle network: missing {result.missing_keys[:5]}"
                           f"{'...' if len(result.missing_keys) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
                           f"{'...' if len(result.unexpected_keys) > 5 else ''}; nothing written")

    target = DTYPES[dtype]
    converted = {k: (v.to(target) if v.is_floating_point() else v) for k, v in network.state_dict().items()}
    _refuse_non_finite(converted, source, "; nothing written")
    target_file.parent.mkdir(parents=True, exist_ok=True)
    output = save_state_dict(converted, target_file)
    report = ImportReport(
        source=str(source.resolve()), source_sha256=digest, weights=matched.name if matched else None,
        output=str(output), output_sha256=sha256_of(output), dtype=dtype,
        in_channels=getattr(network, "in_channels", None),
        missing_keys=list(result.missing_keys), unexpected_keys=list(result.unexpected_keys),
        imported_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    report.write(bundle_dir / PROVENANCE_FILE if stage is None else target_file.with_suffix(".json"))
    return report


def installed_weights_path(bundle: str | os.PathLike) -> str:
    """Path of the bundle's ``models/model.pt``; a :class:`WeightsError` saying how to get it when absent.

    Bundles whose weights may not be redistributed ship without them; their inference configs
    ask for the file through this, so a missing download is one clear line, not a traceback.
    """
    bundle_dir = Path(bundle).resolve()
    model_file = bundle_dir / MODEL_FILE
    if not model_file.is_file():
        raise WeightsError(f"{model_file}: missing; {how_to_get_weights(bundle_dir)}")
    return str(model_file)


def how_to_get_weights(bundle_dir: Path) -> str:
    """The command that installs weights into this bundle folder: fetch where a download is
    registered, else import of the user's own copy (with where the authors publish it)."""
    name = bundle_name(bundle_dir)
    try:
        target = name if find_bundle(name) == bundle_dir else str(bundle_dir)
    except MedfmError:
        target = str(bundle_dir)
    entries = registry.for_bundle(name)
    downloadable = sorted((e for e in entries if e.url), key=lambda e: not e.default)
    if downloadable:
        return f"run 'medfm weights fetch {target}' (downloads {downloadable[0].name}) or 'medfm weights import {target} FILE'"
    published = "; ".join(f"{e.name}: {e.source}" for e in entries if e.source)
    return (f"no download is registered: get the checkpoint{f' ({published})' if published else ''} and run "
            f"'medfm weights import {target} FILE'")


def _refuse_non_finite(state: dict, source: Path, consequence: str = "") -> None:
    """A :class:`WeightsError` naming the tensors that hold NaN or Inf (such weights give NaN outputs for every input)."""
    bad = {key: int((~torch.isfinite(value)).sum()) for key, value in state.items()
           if value.is_floating_point() and not bool(torch.isfinite(value).all())}
    if bad:
        named = ", ".join(f"{key} ({count:,})" for key, count in list(bad.items())[:3])
        raise WeightsError(f"{source}: {len(bad)} tensor(s) hold NaN or infinite values: {named}"
                           f"{', ...' if len(bad) > 3 else ''}{consequence}")


def verify_bundle_weights(bundle: str | os.PathLike) -> list[str]:
    """Check that ``models/model.pt`` loads strictly into the bundle network and holds finite
    values; report what it is, and which tensors a partial import left at fresh initialisation."""
    bundle_dir = find_bundle(bundle)
    model_file = Path(installed_weights_path(bundle_dir))
    state = load_checkpoint(model_file)
    network = bundle_network(bundle_dir)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise WeightsError(f"{model_file}: does not load into the bundle network: {str(error).splitlines()[0]}") from None
    _refuse_non_finite(state, model_file)
    digest = sha256_of(model_file)
    record, _ = read_provenance(bundle_dir)
    fresh = record.get("missing_keys") if record is not None and record.get("output_sha256") == digest else None
    if fresh:
        lines = [f"{model_file}: loads into the bundle network ({len(state)} tensors, sha256 {digest}), but the "
                 f"import (--strict False) found no weights for {len(fresh)} of them, which hold fresh random values: "
                 f"{', '.join(map(str, fresh[:5]))}{', ...' if len(fresh) > 5 else ''}"]
    else:
        lines = [f"{model_file}: loads strictly ({len(state)} tensors, sha256 {digest})"]
    name, note = identify_weights(bundle_dir, digest)
    if note:
        lines.append(note)
    entry = registry.REGISTRY.get(name) if name else None
    if entry:
        lines.append(f"registered weights {entry.name!r}: {entry.title}; licence: {entry.license}")
    return lines


def fetch_weights(bundle: str | os.PathLike, weights: str | None = None, url: str | None = None,
                  progress: bool = True) -> ImportReport:
    """Download registered weights (or reuse the verified cached copy) and import them into the bundle.

    ``url`` replaces the registered URL (a mirror or a local server); the registered size and
    sha256 are checked either way. Downloads are cached in ``$MEDFM_HOME/weights``.
    """
    bundle_dir = find_bundle(bundle)
    entry = registry.get(weights) if weights else registry.default_for_bundle(bundle_name(bundle_dir))
    if entry.bundle != bundle_name(bundle_dir):
        raise WeightsError(f"weights {entry.name!r} belong to bundle {entry.bundle!r}, not {bundle_dir.name!r}")
    source = url or entry.url
    if not source:
        raise WeightsError(f"weights {entry.name!r} have no download URL: {entry.how_to_get()}")
    cached = cache_dir() / "weights" / entry.file_name
    if not (cached.is_file() and entry.matches(sha256_of(cached))):
        download(source, cached, sha256=entry.sha256, size=entry.size, progress=progress)
    return import_weights(bundle_dir, cached, weights=entry.name)
