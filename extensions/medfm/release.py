"""Bundle archives as ``monai.bundle.download`` expects them, with a model-zoo style index.

Each archive is ``<name>_v<version>.zip`` holding one top-level ``<name>/`` folder: the bundle's
configs, docs, ``LICENSE`` and ``large_files.yml``, plus ``models/model.pt`` (and its provenance
record) only when the registry says those weights may be redistributed, or, asked for, a task bundle's
own fine-tuned weights when the weights they were fine-tuned from allow it. Archives are
byte-reproducible (fixed timestamps and order), so their sha256 in ``model_info.json`` is stable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import urllib.parse
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .bundles import Bundle, cache_dir, find_bundle, list_bundle_dirs
from .errors import MedfmError
from .io.atomic import atomic_path
from .io.archives import ArchiveError, safe_extract_zip
from .weights import registry
from .weights.records import sha256_of
from .weights.download import download

__all__ = ["ReleasedBundle", "build_release", "release_bundles", "download_bundle", "MODEL_INFO"]

MODEL_INFO = "model_info.json"
#: What a released bundle holds besides its weights (folders are taken whole).
RELEASED = ("configs", "docs", "LICENSE", "large_files.yml")
WEIGHTS = ("models/model.pt", "models/weights.json")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class ReleasedBundle:
    """One archive: what ``model_info.json`` records about it."""

    name: str
    version: str
    file: str
    sha256: str
    size: int
    source: str
    weights: str

    @property
    def key(self) -> str:
        return f"{self.name}_v{self.version}"


def _own_weights(bundle: Bundle) -> str:
    """What a task bundle's own weights are called in the index, once their source allows sharing them.

    They derive from the weights they were fine-tuned from, whose licence applies to them: weights from scratch
    or from redistributable weights may ship; weights from any other source may not (one line says why).
    """
    made = bundle.metadata.get("task_bundle")
    if not isinstance(made, dict):
        raise MedfmError(f"{bundle.root}: is not a task bundle, so it has no weights of its own to release (its "
                         "weights ship only where the registry says they may)")
    source_sha256, source_id = made.get("source_sha256"), made.get("source_weights")
    if source_sha256 is not None:
        entry = registry.match_sha256(str(source_sha256))
        if entry is None or not entry.redistributable:
            licence = entry.license if entry else "not one medfm knows (imported weights)"
            raise MedfmError(f"{bundle.root}: its weights were fine-tuned from {source_id}, whose licence is {licence}; "
                             "they cannot be released with it")
    return f"{bundle.name} (fine-tuned from {source_id or 'none'})"


def _release_files(bundle: Bundle, own_weights: bool = False) -> tuple[list[Path], str]:
    """The files to archive and which weights they include (``none`` when not redistributable).

    A symbolic link anywhere in the released parts is refused: following it would pack whatever
    it points at, from anywhere on the machine, into a public archive.
    """
    bundle_dir = bundle.root
    missing = [name for name in RELEASED if not (bundle_dir / name).exists() and not (bundle_dir / name).is_symlink()]
    if missing:
        raise MedfmError(f"{bundle_dir}: cannot be released, missing {', '.join(missing)}")
    files = []
    for name in RELEASED:
        top = bundle_dir / name
        for path in [top, *(sorted(top.rglob("*")) if top.is_dir() and not top.is_symlink() else [])]:
            if path.is_symlink():
                raise MedfmError(f"{path}: is a symbolic link; a release holds only the bundle's own regular files")
            if path.is_file():
                files.append(path)
    for weights_file in (bundle_dir / w for w in WEIGHTS):
        if weights_file.is_symlink():
            raise MedfmError(f"{weights_file}: is a symbolic link; a release holds only the bundle's own regular files")
    model = bundle_dir / WEIGHTS[0]
    if own_weights:
        weights = _own_weights(bundle)
        if not model.is_file():
            raise MedfmError(f"{model}: missing, so there are no weights to release")
        return files + [p for p in (bundle_dir / w for w in WEIGHTS) if p.is_file()], weights
    if not model.is_file():
        return files, "none"
    entry = registry.match_sha256(sha256_of(model))
    if entry is None or not entry.redistributable:
        return files, "none"  # imported or self-trained weights stay with their owner
    return files + [p for p in (bundle_dir / w for w in WEIGHTS) if p.is_file()], entry.name


def build_release(bundle: str | os.PathLike, out_dir: str | os.PathLike, base_url: str = "",
                  own_weights: bool = False) -> ReleasedBundle:
    """Write ``<out_dir>/<name>_v<version>.zip`` for one bundle; ``base_url`` prefixes its ``source``;
    ``own_weights`` packs a task bundle's fine-tuned weights (:func:`_own_weights` says when they may ship)."""
    found = Bundle.find(bundle)
    bundle_dir, metadata = found.root, found.metadata
    name, version = bundle_dir.name, str(metadata.get("version", ""))
    if metadata.get("name") != name or not version:
        raise MedfmError(f"{bundle_dir}: metadata.json must name the bundle {name!r} and give its version")
    files, weights = _release_files(found, own_weights)
    target = Path(out_dir) / f"{name}_v{version}.zip"
    with atomic_path(target) as temporary:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in files:
                info = zipfile.ZipInfo(f"{name}/{path.relative_to(bundle_dir).as_posix()}", date_time=_ZIP_TIME)
                info.external_attr = 0o644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, path.read_bytes())
    source = f"{base_url.rstrip('/')}/{target.name}" if base_url else target.name
    return ReleasedBundle(name=name, version=version, file=target.name, sha256=sha256_of(target),
                          size=target.stat().st_size, source=source, weights=weights)


def release_bundles(out_dir: str | os.PathLike, bundles: list[str] | None = None, base_url: str = "",
                    own_weights: bool = False) -> list[ReleasedBundle]:
    """Archive ``bundles`` (default: every bundle found) and write ``model_info.json`` beside them."""
    chosen = [find_bundle(b) for b in bundles] if bundles else list_bundle_dirs()
    if not chosen:
        raise MedfmError("no bundles to release")
    released = [build_release(b, out_dir, base_url, own_weights) for b in chosen]
    index = {r.key: {k: v for k, v in asdict(r).items()} for r in released}
    with atomic_path(Path(out_dir) / MODEL_INFO) as temporary:
        temporary.write_text(json.dumps(index, indent=2) + "\n")
    return released


_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _read_index(index_url: str, scratch: Path) -> dict:
    """``model_info.json`` from a URL: a JSON object of entries."""
    index_file = download(index_url, scratch / MODEL_INFO, progress=False)
    try:
        index = json.loads(index_file.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise MedfmError(f"{index_url}: not a readable {MODEL_INFO} ({error})") from None
    if not isinstance(index, dict):
        raise MedfmError(f"{index_url}: not a {MODEL_INFO}: its top level is a JSON {type(index).__name__}, not an object")
    return index


def _checked_entry(key: str, entry: dict, index_url: str) -> dict:
    """An index entry whose every field has the type and form a release writes (an index is untrusted)."""
    where = f"{index_url}: entry {key!r}"
    version = entry.get("version")
    if not isinstance(version, str) or not re.fullmatch(r"[0-9A-Za-z][0-9A-Za-z.+-]*", version):
        raise MedfmError(f"{where}: 'version' must be a version string such as '0.1.0', not {version!r}")
    file = entry.get("file")
    if not isinstance(file, str) or not _PLAIN_NAME.fullmatch(file) or not file.endswith(".zip"):
        raise MedfmError(f"{where}: 'file' must be a plain .zip file name (no folders, no '..'), not {file!r}")
    sha256 = entry.get("sha256")
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256.lower()):
        raise MedfmError(f"{where}: 'sha256' must be 64 hexadecimal digits, not {sha256!r}")
    size = entry.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise MedfmError(f"{where}: 'size' must be a whole number of bytes, not {size!r}")
    source = entry.get("source")
    if source is not None and not isinstance(source, str):
        raise MedfmError(f"{where}: 'source' must be a URL or file name, not {source!r}")
    scheme = urllib.parse.urlparse(source or "").scheme
    if scheme and scheme not in ("http", "https", urllib.parse.urlparse(index_url).scheme):
        raise MedfmError(f"{where}: 'source' has the scheme {scheme!r}; only http(s) or the index's own are followed")
    return entry


def download_bundle(name: str, index: str, version: str | None = None, bundle_dir: str | os.PathLike | None = None,
                    progress: bool = True) -> Path:
    """Download a released bundle listed in ``index`` (a ``model_info.json`` URL or path) and unpack it.

    Unlike ``monai.bundle.download``, every field of the index entry is checked, the archive's
    size and sha256 are checked against the index before anything is unpacked, members that
    would land outside the target (or unpack beyond ``$MEDFM_MAX_UNPACKED_GIB``) are refused,
    and the bundle appears under ``bundle_dir`` (default ``$MEDFM_HOME/bundles``) only once it
    is complete. An existing copy of the bundle is replaced.
    """
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
        raise MedfmError(f"{name!r} is not a bundle name (letters, digits, '.', '_' and '-')")
    if not urllib.parse.urlparse(index).scheme:
        index = Path(index).resolve().as_uri()
    target_root = Path(bundle_dir) if bundle_dir else cache_dir() / "bundles"
    target_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=target_root) as scratch:
        scratch = Path(scratch)
        entries = {k: _checked_entry(k, v, index) for k, v in _read_index(index, scratch).items()
                   if isinstance(v, dict) and v.get("name") == name}
        if version:
            entries = {k: v for k, v in entries.items() if v["version"] == version}
        if not entries:
            raise MedfmError(f"{index}: lists no bundle {name!r}{f' version {version}' if version else ''}")
        entry = max(entries.values(), key=lambda e: tuple(int(p) if p.isdigit() else 0 for p in e["version"].split(".")))
        source = entry.get("source") or entry["file"]
        url = source if urllib.parse.urlparse(source).scheme else urllib.parse.urljoin(index, entry["file"])
        archive = download(url, scratch / "archive.zip", sha256=entry["sha256"], size=entry.get("size"), progress=progress)
        try:
            unpacked = safe_extract_zip(archive, scratch / "unpacked")
        except ArchiveError as error:
            raise MedfmError(f"{url}: {str(error).split(': ', 1)[-1]}") from None
        top = [p.name for p in unpacked.iterdir()]
        if top != [name] or not (unpacked / name / "configs" / "metadata.json").is_file():
            raise MedfmError(f"{url}: not a release of {name!r} (top-level entries: {', '.join(top) or 'none'})")
        destination = target_root / name
        if destination.exists():
            shutil.rmtree(destination)
        (unpacked / name).replace(destination)
    return destination
