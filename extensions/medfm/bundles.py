"""Finding bundles: by path, in the repository's ``bundles/`` folder, or in the download cache."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BundleNotFoundError, MedfmError

if TYPE_CHECKING:  # torch and MONAI load only when a config is read (medfm list and info need neither)
    import torch
    from monai.bundle import ConfigParser

__all__ = ["Bundle", "read_metadata", "bundle_name", "bundle_config", "metadata_schema", "bundle_network", "cache_dir", "find_bundle", "list_bundle_dirs", "repository_bundles_dir"]

#: Environment variable naming medfm's cache folder (downloaded bundles and weights).
CACHE_ENV = "MEDFM_HOME"


def cache_dir() -> Path:
    """``$MEDFM_HOME`` or ``~/.cache/medfm``; bundles live in ``bundles/``, downloads in ``weights/``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "medfm").expanduser()


def repository_bundles_dir() -> Path | None:
    """The source checkout's ``bundles/`` folder when medfm runs from one (editable install)."""
    candidate = Path(__file__).resolve().parents[2] / "bundles"
    return candidate if candidate.is_dir() else None


def _search_dirs() -> list[Path]:
    return [d for d in (repository_bundles_dir(), cache_dir() / "bundles") if d is not None and d.is_dir()]


def list_bundle_dirs() -> list[Path]:
    """Every bundle found in the repository and the cache (the repository wins on equal names)."""
    found: dict[str, Path] = {}
    for directory in _search_dirs():
        for child in sorted(directory.iterdir()):
            if (child / "configs" / "metadata.json").is_file():
                found.setdefault(child.name, child)
    return list(found.values())


def find_bundle(name_or_path: str | os.PathLike) -> Path:
    """Resolve a bundle given as a folder path or as a name; absolute path of its root folder."""
    path = Path(name_or_path).expanduser()
    if (path / "configs" / "metadata.json").is_file():
        return path.resolve()
    if path.exists():
        raise BundleNotFoundError(f"{path}: not a MONAI bundle (no configs/metadata.json)")
    for directory in _search_dirs():
        candidate = directory / str(name_or_path)
        if (candidate / "configs" / "metadata.json").is_file():
            return candidate.resolve()
    known = ", ".join(d.name for d in list_bundle_dirs()) or "none"
    searched = ", ".join(str(d) for d in _search_dirs()) or f"no bundle folders (set {CACHE_ENV})"
    raise BundleNotFoundError(f"unknown bundle {str(name_or_path)!r}: known bundles: {known} (searched {searched})")


def read_metadata(bundle_dir: str | os.PathLike) -> dict:
    """A bundle's ``configs/metadata.json``; one line naming the file when it is not a JSON object."""
    path = Path(bundle_dir) / "configs" / "metadata.json"
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise MedfmError(f"{path}: not readable as JSON ({error})") from None
    if not isinstance(metadata, dict):
        raise MedfmError(f"{path}: not a JSON object")
    return metadata


def bundle_name(bundle_dir: str | os.PathLike) -> str:
    """The bundle's identity: the ``name`` in its ``configs/metadata.json`` (a renamed copy of the
    folder keeps it), else the folder's name."""
    try:
        name = read_metadata(bundle_dir).get("name")
    except MedfmError:
        name = None
    return name if isinstance(name, str) and name else Path(bundle_dir).name


@dataclass(frozen=True)
class Bundle:
    """A bundle as medfm sees it: its folder and its metadata, read once (:meth:`find`)."""

    root: Path
    metadata: dict

    @classmethod
    def find(cls, name_or_path: str | os.PathLike | Bundle) -> Bundle:
        """A bundle by folder path or by name (:func:`find_bundle`)."""
        if isinstance(name_or_path, Bundle):
            return name_or_path
        root = find_bundle(name_or_path)
        return cls(root, read_metadata(root))

    @property
    def name(self) -> str:
        """The ``name`` in the metadata (a renamed copy of the folder keeps it), else the folder's name."""
        name = self.metadata.get("name")
        return name if isinstance(name, str) and name else self.root.name

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", ""))

    @property
    def contract(self) -> dict:
        """The ``input_contract`` (empty when the metadata has none)."""
        contract = self.metadata.get("input_contract")
        return contract if isinstance(contract, dict) else {}

    @property
    def weights_file(self) -> Path:
        """Where the bundle's installed weights live (``models/model.pt``; it may not exist)."""
        return self.root / "models" / "model.pt"

    @cached_property
    def weights_id(self) -> str:
        """Which weights ``models/model.pt`` holds: a registry name, ``unregistered:<sha256 prefix>`` or ``none``."""
        from .weights.records import installed_weights_id

        return installed_weights_id(self.root)

    def config(self, name: str) -> Path:
        """The path of ``configs/<name>``."""
        return self.root / "configs" / name

    @property
    def fine_tuning_configs(self) -> dict[str, str]:
        """The fine-tuning config per task (``segmentation``: ``configs/train.json``...); empty for a task bundle."""
        configs = self.metadata.get("fine_tuning_configs")
        return dict(configs) if isinstance(configs, dict) else {}

    @cached_property
    def runs_cohorts(self) -> bool:
        """Whether its inference is a cohort run (a task bundle's ``runner``), not one scan's workflow."""
        try:
            return "runner" in json.loads(self.config("inference.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            return False


def bundle_config(bundle_dir: str | os.PathLike, config: str | Sequence[str] = "inference.json") -> ConfigParser:
    """A parser for one of the bundle's configs (or a base and its overlays, merged in order),
    with ``bundle_root`` set to the bundle folder."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    names = [config] if isinstance(config, str) else list(config)
    parser.read_config([str(Path(bundle_dir) / "configs" / name) for name in names])
    parser["bundle_root"] = str(bundle_dir)
    return parser


def bundle_network(bundle: str | os.PathLike, **network_overrides) -> torch.nn.Module:
    """Instantiate ``network_def`` from the bundle's (name or folder) ``configs/inference.json`` (CPU, fresh weights)."""
    parser = bundle_config(find_bundle(bundle))
    for key, value in network_overrides.items():
        parser[f"network_def#{key}"] = value
    return parser.get_parsed_content("network_def")


#: The model zoo's metadata schemas shipped with medfm, by file name (see ``schemas/README.md``).
SCHEMAS_DIR = Path(__file__).parent / "schemas"


def metadata_schema(bundle: str | os.PathLike) -> Path:
    """The shipped copy of the schema that the bundle's ``metadata.json`` names in ``schema``, for MONAI's
    ``verify_metadata --filepath`` (which then reads it instead of downloading it)."""
    import json
    from urllib.parse import urlparse

    metadata_file = find_bundle(bundle) / "configs" / "metadata.json"
    try:
        url = json.loads(metadata_file.read_text(encoding="utf-8"))["schema"]
        name = Path(urlparse(url).path).name
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise MedfmError(f"{metadata_file}: no readable \"schema\" URL ({error})") from None
    copy = SCHEMAS_DIR / name
    if not name or not copy.is_file():
        shipped = ", ".join(sorted(p.name for p in SCHEMAS_DIR.glob("*.json"))) or "none"
        raise MedfmError(f"{metadata_file}: medfm ships no copy of the schema {url} (it has: {shipped}); "
                         "verify_metadata would download it")
    return copy
