"""Import records (``models/weights.json``) and which weights a bundle holds, read without torch (``medfm list``)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import first_line
from . import registry

__all__ = ["ImportReport", "MODEL_FILE", "PROVENANCE_FILE", "identify_weights", "installed_weights_id", "read_provenance",
           "sha256_of", "checkpoint_weights_id", "demo_weights_warning", "weights_description"]

MODEL_FILE = Path("models") / "model.pt"
#: Written beside model.pt: which weights these are, from which file, imported when.
PROVENANCE_FILE = Path("models") / "weights.json"


def sha256_of(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=32)
def _unchanged_file_sha256(path: str, size: int, mtime_ns: int, inode: int) -> str:
    return sha256_of(path)


def _weights_sha256(path: str | os.PathLike) -> str:
    """``sha256_of`` for naming the weights a run uses, remembered in this process while the file is unchanged
    (same size, modification time and inode): one run names them in its index rows, its output headers, its
    report and its demo check. Downloads and imports are verified with ``sha256_of`` itself, never remembered."""
    stat = os.stat(path)
    return _unchanged_file_sha256(os.path.realpath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)


@dataclass
class ImportReport:
    source: str
    source_sha256: str
    weights: str | None
    output: str
    output_sha256: str
    dtype: str
    in_channels: int | None
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    imported_at: str = ""

    def write(self, path: str | os.PathLike) -> None:
        """Save as the import record (``models/weights.json``) that ``medfm info`` and ``weights verify`` read."""
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    def lines(self) -> list[str]:
        known = f"registered weights {self.weights!r}" if self.weights else "not a registered checkpoint"
        return [
            f"read   {self.source} (sha256 {self.source_sha256[:16]}..., {known})",
            f"wrote  {self.output} ({self.dtype}, input channels: {self.in_channels})",
            f"missing keys: {len(self.missing_keys)}, unexpected keys: {len(self.unexpected_keys)}",
        ]


def read_provenance(bundle_dir: str | os.PathLike) -> tuple[dict | None, str | None]:
    """The bundle's ``models/weights.json`` import record, or ``None`` and a line saying why it
    cannot be used (absent: no line). A damaged record never stops a run: the weights themselves
    are identified by their sha256."""
    provenance = Path(bundle_dir) / PROVENANCE_FILE
    if not provenance.is_file():
        return None, None
    try:
        record = json.loads(provenance.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as error:
        return None, f"{provenance}: unreadable ({type(error).__name__}: {first_line(error)}); provenance unknown"
    if not isinstance(record, dict):
        return None, f"{provenance}: not a JSON object; provenance unknown"
    return record, None


def identify_weights(bundle_dir: Path, digest: str) -> tuple[str | None, str | None]:
    """Registry name of the model file with sha256 ``digest`` (from its import record, else its
    hash), and a line saying where the record says it came from."""
    provenance = bundle_dir / PROVENANCE_FILE
    name = None
    record, note = read_provenance(bundle_dir)
    if record is not None:
        if record.get("output_sha256") != digest:
            note = f"{provenance}: describes another file (sha256 {record.get('output_sha256')}); provenance unknown"
        else:
            name = record.get("weights") if isinstance(record.get("weights"), str) else None
            note = (f"imported from {record.get('source')} as "
                    f"{f'registered weights {name!r}' if name else 'unregistered weights'}")
    if name is None:
        entry = registry.match_sha256(digest)
        name = entry.name if entry else None
    return name, note


def installed_weights_id(bundle: str | os.PathLike, digest: str | None = None) -> str:
    """Which weights ``models/model.pt`` holds: a registry name, ``unregistered:<sha256 prefix>``, or ``none``.

    ``digest``: the file's sha256 when the caller already has it (the file is not hashed again).
    """
    model_file = Path(bundle) / MODEL_FILE
    if not model_file.is_file():
        return "none"
    digest = digest or _weights_sha256(model_file)
    name, _ = identify_weights(Path(bundle), digest)
    return name or f"unregistered:{digest[:16]}"


def checkpoint_weights_id(bundle: str | os.PathLike, checkpoint: str | os.PathLike | None) -> tuple[str, str | None]:
    """Which weights a run loads from ``checkpoint`` (a bundle config's ``ckpt_path``), and the file's sha256: the
    installed ``models/model.pt``'s id, a registered name matched by sha256, ``unregistered:<prefix>``, or
    ``none`` where there is no file (the network keeps its random initialisation)."""
    if checkpoint is None or not Path(checkpoint).is_file():
        return "none", None
    digest = _weights_sha256(checkpoint)
    if Path(checkpoint).resolve() == (Path(bundle) / MODEL_FILE).resolve():
        return installed_weights_id(bundle, digest), digest
    entry = registry.match_sha256(digest)
    return (entry.name if entry else f"unregistered:{digest[:16]}"), digest


def weights_description(bundle: str | os.PathLike, checkpoint: str | os.PathLike | None) -> str:
    """Which model made an output, for its file's own metadata (a NIfTI ``descrip`` holds 80 bytes):
    ``"medfm <bundle> <version>, weights <id>"`` for the weights in ``checkpoint``, led by ``DEMO:`` for demo
    weights (first, so that a cut at the field's end never drops it)."""
    bundle_dir = Path(bundle)
    metadata = json.loads((bundle_dir / "configs" / "metadata.json").read_text(encoding="utf-8"))
    weights, _ = checkpoint_weights_id(bundle_dir, checkpoint)
    entry = registry.REGISTRY.get(weights)
    demo = "DEMO: " if entry is not None and entry.demo else ""
    return f"{demo}medfm {metadata.get('name', bundle_dir.name)} {metadata.get('version', '')}, weights {weights}"


def demo_weights_warning(bundle: str | os.PathLike) -> str | None:
    """A warning for outputs made with ``demo`` weights (they must never pass for results), else None."""
    entry = registry.REGISTRY.get(installed_weights_id(bundle))
    if entry is None or not entry.demo:
        return None
    official = registry.default_for_bundle(entry.bundle)
    return (f"these outputs were made with {entry.name}, demo weights that only show the workflow runs; they are not "
            f"results. For the official weights ({official.name}): {official.how_to_get()}")

