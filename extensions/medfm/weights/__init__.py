"""Weights: the registry of checkpoints, safe loading, verified download and import into bundles."""

from .._lazy import lazy_attributes
from .download import download  # light; bound here so the submodule of the same name can never shadow it

__all__ = [
    "ImportReport",
    "REGISTRY",
    "WeightsEntry",
    "checkpoint_weights_id",
    "default_for_bundle",
    "demo_weights_warning",
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
    "weights_description",
]

# the registry is read without torch (medfm list, info); loading and importing checkpoints need it
__getattr__, __dir__ = lazy_attributes(__name__, attributes={
    "load_checkpoint": ".checkpoint",
    **dict.fromkeys(["fetch_weights", "import_weights", "installed_weights_path", "verify_bundle_weights"], ".importer"),
    **dict.fromkeys(["ImportReport", "checkpoint_weights_id", "demo_weights_warning", "installed_weights_id", "sha256_of", "weights_description"],
                    ".records"),
    **dict.fromkeys(["REGISTRY", "WeightsEntry", "default_for_bundle", "for_bundle", "get"], ".registry")})
