"""Weights: the registry of checkpoints, safe loading, verified download and import into bundles."""

from .checkpoint import load_checkpoint, sha256_of
from .download import download
from .importer import fetch_weights, import_weights, installed_weights_id, installed_weights_path, verify_bundle_weights
from .registry import REGISTRY, WeightsEntry, default_for_bundle, for_bundle, get

__all__ = [
    "REGISTRY",
    "WeightsEntry",
    "default_for_bundle",
    "download",
    "fetch_weights",
    "for_bundle",
    "get",
    "import_weights",
    "installed_weights_id",
    "installed_weights_path",
    "load_checkpoint",
    "sha256_of",
    "verify_bundle_weights",
]
