"""What each bundle is and which weights it has: the facts behind ``medfm list`` and ``medfm info``.

Everything comes from the bundles' ``metadata.json`` and the weights registry, so the CLI never
repeats a fact the bundle or the registry already states.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .bundles import bundle_name, find_bundle, list_bundle_dirs
from .errors import describe_error
from .weights import registry
from .weights.records import installed_weights_id, read_provenance

__all__ = ["bundle_summary", "bundle_summaries", "bundle_info", "eval_metrics", "weights_section",
           "with_current_eval_metrics", "with_current_weights_section"]

CODE_LICENCE = "Apache-2.0"


def _metadata(bundle_dir: Path) -> dict:
    """The metadata as it is: a damaged file raises the reader's own error, which the listing reports per bundle."""
    return json.loads((bundle_dir / "configs" / "metadata.json").read_text())


def _weights_licence(entry: registry.WeightsEntry) -> str:
    """``name: licence`` with restrictions flagged first (no licence at all, or non-commercial)."""
    if entry.license_spdx is None:
        return f"{entry.name}: NO LICENCE (all rights reserved by the authors)"
    return f"{entry.name}: {'' if entry.commercial_use else 'NON-COMMERCIAL: '}{entry.license_spdx}"


def bundle_summary(bundle_dir: Path) -> dict[str, str]:
    """One row of ``medfm list``."""
    metadata = _metadata(bundle_dir)
    modality = metadata.get("input_contract", {}).get("modality", "")
    entries = registry.for_bundle(bundle_name(bundle_dir))
    upstream = [f"{e.name} ({e.availability}{', default' if e.default else ''})" for e in entries]
    return {
        "bundle": bundle_name(bundle_dir),
        "version": str(metadata.get("version", "")),
        "task": str(metadata.get("task", "")),
        "modality": ", ".join(modality) if isinstance(modality, list) else str(modality),
        "installed weights": installed_weights_id(bundle_dir),
        "registered weights": "; ".join(upstream) or "none",
        "code licence": CODE_LICENCE,
        "weights licence": "; ".join(_weights_licence(e) for e in entries) or "n/a",
    }


def bundle_summaries() -> tuple[list[dict[str, str]], list[str]]:
    """Rows for every bundle found (repository and ``$MEDFM_HOME/bundles``), and one line for each
    bundle that cannot be read (a damaged download never hides the others)."""
    rows, broken = [], []
    for bundle_dir in list_bundle_dirs():
        try:
            rows.append(bundle_summary(bundle_dir))
        except (ValueError, UnicodeDecodeError, OSError, AttributeError) as error:
            broken.append(f"{bundle_dir / 'configs' / 'metadata.json'}: unreadable ({describe_error(error)}); bundle skipped")
    return rows, broken


def bundle_info(bundle: str | os.PathLike) -> list[str]:
    """The lines of ``medfm info``: metadata, input contract, weights and their provenance, citation."""
    bundle_dir = find_bundle(bundle)
    metadata = _metadata(bundle_dir)
    lines = [f"{bundle_name(bundle_dir)} {metadata.get('version', '')}: {metadata.get('name_of_model', '')}",
             f"folder: {bundle_dir}", f"task: {metadata.get('task', '')}", "", str(metadata.get("description", "")), "",
             f"intended use: {metadata.get('intended_use', '')}", "", "input contract:"]
    lines += [f"  {key}: {json.dumps(value)}" for key, value in metadata.get("input_contract", {}).items()]
    lines += ["", f"installed weights: {installed_weights_id(bundle_dir)}"]
    defaults = [entry.name for entry in registry.for_bundle(bundle_name(bundle_dir)) if entry.default]
    lines += [f"default weights: {name}" for name in defaults]
    record, problem = read_provenance(bundle_dir)
    if problem:
        lines.append(f"  {problem}")
    if record is not None:
        lines.append(f"  imported from {record.get('source')} (sha256 {str(record.get('source_sha256'))[:16]}...) "
                     f"at {record.get('imported_at')}")
    for entry in registry.for_bundle(bundle_name(bundle_dir)):
        lines += ["", f"registered weights {entry.name}: {entry.title}",
                  f"  licence: {entry.license}{'' if entry.commercial_use else ' [no commercial use]'}",
                  f"  source: {entry.url or entry.source}",
                  f"  sha256: {entry.sha256 or 'not published'}; size: {f'{entry.size:,} bytes' if entry.size else 'unknown'}",
                  f"  trained on: {entry.trained_on}", f"  preprocessing: {entry.preprocessing}"]
    lines += ["", "cite:"] + [f"  {reference}" for reference in metadata.get("references", [])]
    return lines


#: Markers around the part of a bundle's ``docs/README.md`` generated from the registry (``weights_section``).
GENERATED_START = "<!-- generated from medfm.weights.registry by docs/update_model_cards.py: do not edit -->"
GENERATED_END = "<!-- end of generated part -->"


def weights_section(bundle: str) -> str:
    """Markdown of every registered weights file of ``bundle``, from the registry alone (as torchvision's
    weights docs come from the weights' own metadata)."""
    entries = registry.for_bundle(bundle)
    rows = ["| | " + " | ".join(f"`{entry.name}`" for entry in entries) + " |", "|---|" + "---|" * len(entries)]
    how_to_get = {"download": lambda e: f"`medfm weights fetch {bundle}{'' if e.default else f' --weights {e.name}'}`",
                  "ships with the bundle": lambda e: "ships with the bundle",
                  "import your copy": lambda e: f"import your copy: {e.source}"}
    fields = [("what", lambda e: e.title), ("default", lambda e: "yes" if e.default else "no"),
              ("file", lambda e: f"`{e.file_name}`"), ("how to get it", lambda e: how_to_get[e.availability](e)),
              ("sha256", lambda e: f"`{e.sha256}`" if e.sha256 else "not published"),
              ("size", lambda e: f"{e.size:,} bytes" if e.size else "unknown"),
              ("licence", lambda e: e.license if e.license.startswith(e.license_spdx or "none")
               else f"{e.license_spdx or 'none'}: {e.license}"), ("commercial use", lambda e: "yes" if e.commercial_use else "**no**"),
              ("redistributable", lambda e: "yes" if e.redistributable else "no"),
              ("trained on", lambda e: e.trained_on), ("preprocessing", lambda e: e.preprocessing),
              ("parameters", lambda e: f"{e.num_params:,}"),
              ("reported metrics", lambda e: "; ".join(f"{m.task}: {m}" for m in e.metrics) or "none published"),
              ("paper", lambda e: e.paper), ("notes", lambda e: e.notes or "")]
    for label, value in fields:
        rows.append(f"| {label} | " + " | ".join(value(e).replace("|", "\\|") for e in entries) + " |")
    return "\n".join([GENERATED_START, *rows, GENERATED_END])


def with_current_weights_section(card: str, bundle: str) -> str:
    """``card`` (a model card's text) with its generated weights part replaced by the registry's current one."""
    before, start, rest = card.partition(GENERATED_START)
    _, end, after = rest.partition(GENERATED_END)
    if not (start and end):
        raise ValueError(f"{bundle}: the model card has no generated weights part (markers {GENERATED_START!r} ...)")
    return before + weights_section(bundle) + after


def eval_metrics(bundle: str) -> dict[str, float]:
    """``metadata.json``'s ``eval_metrics``: each registered weights file's reported results, by
    ``"<weights>: <task> (<unit>)"`` (the baselines reported beside them are in the model card)."""
    return {f"{entry.name}: {metric.task}" + (f" ({metric.unit})" if metric.unit else ""): metric.value
            for entry in registry.for_bundle(bundle) for metric in entry.metrics}


def with_current_eval_metrics(metadata_text: str, bundle: str) -> str:
    """``metadata_text`` (a ``metadata.json``) with its top-level ``eval_metrics`` object replaced by the
    registry's, the rest of the file untouched."""
    key = '\n    "eval_metrics": '
    start = metadata_text.find(key)
    if start < 0:
        raise ValueError(f"{bundle}: metadata.json has no top-level eval_metrics")
    start += len(key)
    _, end = json.JSONDecoder().raw_decode(metadata_text, start)
    body = json.dumps(eval_metrics(bundle), indent=4, ensure_ascii=False).replace("\n", "\n    ")
    return metadata_text[:start] + body + metadata_text[end:]
