"""Checking an input against the conditions a model was pre-trained under (its input contract).

A bundle's ``configs/metadata.json`` declares the contract under ``input_contract``::

    {"modality": "CT", "orientation": "LPS",           # or a list, e.g. ["CT", "MR"]
     "spacing_mm": {"min": [0.4, 0.4, 0.5], "max": [1.0, 1.0, 2.5]},
     "intensity": {"method": "hu_window", "window": [-1000, 1000]},
     "patch_size": [64, 64, 32], "divisible_by": 8, "channels": 1,
     "grid_shape": [193, 229, 193], "grid_note": "MNI152 1 mm, registered and skull-stripped",
     "pretraining_data": "LUNA16 chest CT, native spacing"}

Deviations that still allow processing (another modality, spacing outside the pre-training
range, a voxel grid other than the model's, a constant volume) are logged as one-line warnings by the
``medfm.contract`` logger, which ``medfm infer`` prints; a wrong channel count is an error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends

from ..io.reading import ScanError

__all__ = ["read_contract", "contract_deviations", "CheckInputContract", "CheckInputContractd"]

logger = logging.getLogger("medfm.contract")


def read_contract(bundle_root: str | os.PathLike) -> dict:
    """The ``input_contract`` of a bundle's ``configs/metadata.json``."""
    from ..bundles import read_metadata

    contract = read_metadata(bundle_root).get("input_contract")
    if not isinstance(contract, dict):
        raise ValueError(f"{Path(bundle_root) / 'configs' / 'metadata.json'}: no input_contract")
    return contract


def _modality_deviation(image: MetaTensor, contract: dict) -> str | None:
    expected = contract.get("modality")
    accepted = [expected] if isinstance(expected, str) else list(expected or [])
    declared = str(image.meta.get("Modality", "")) if isinstance(image, MetaTensor) else ""
    if declared:
        return None if declared in accepted else f"DICOM modality {declared}, model pre-trained on {' and '.join(accepted)}"
    if accepted == ["CT"]:
        low, high = float(image.min()), float(image.max())
        if low >= 0:  # CT in Hounsfield units always has negative values (air, fat)
            return (f"intensities {low:g} to {high:g} have no negative values, so they are not CT Hounsfield "
                    "units: is this MRI or another modality given to a CT model?")
    return None


def _spacing_deviation(image: MetaTensor, contract: dict) -> str | None:
    limits = contract.get("spacing_mm")
    if not limits or not isinstance(image, MetaTensor):
        return None
    spacing = np.linalg.norm(np.asarray(image.affine, dtype=float)[:3, :3], axis=0)
    low, high = np.asarray(limits["min"], float), np.asarray(limits["max"], float)
    if np.all(spacing >= low - 1e-6) and np.all(spacing <= high + 1e-6):
        return None
    shown = " x ".join(f"{s:g}" for s in spacing)
    expected = " x ".join(f"{a:g}-{b:g}" for a, b in zip(low, high))
    return (f"voxel spacing {shown} mm is outside the pre-training range ({expected} mm, "
            f"{contract.get('pretraining_data', 'pre-training data')})")


def _grid_deviation(image: torch.Tensor, contract: dict) -> str | None:
    expected = contract.get("grid_shape")
    if not expected or list(image.shape[1:]) == list(expected):
        return None
    shown, wanted = (" x ".join(str(int(n)) for n in shape) for shape in (image.shape[1:], expected))
    return (f"voxel grid {shown} is not the model grid {wanted} ({contract.get('grid_note', 'see the bundle docs')}); "
            "it is resampled and padded or cropped, not registered")


def _content_deviation(image: torch.Tensor, contract: dict) -> str | None:
    low, high = float(image.min()), float(image.max())
    if low == high:
        return f"every voxel is {low:g} (a constant volume): the embedding describes no anatomy"
    return None


def contract_deviations(image: MetaTensor, contract: dict) -> list[str]:
    """What about ``image`` (channel-first, after the bundle's reorientation) differs from ``contract``."""
    channels = contract.get("channels")
    if channels is not None and image.shape[0] != channels:
        source = image.meta.get("filename_or_obj", "input") if isinstance(image, MetaTensor) else "input"
        raise ScanError(f"{source}: has {image.shape[0]} channel(s), the model takes {channels}")
    checks = (_modality_deviation, _spacing_deviation, _grid_deviation, _content_deviation)
    return [message for message in (check(image, contract) for check in checks) if message]


class CheckInputContract(Transform):
    """Log each deviation of a channel-first image from ``contract``; the image passes unchanged."""

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, contract: dict) -> None:
        self.contract = contract

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        source = image.meta.get("filename_or_obj", "input") if isinstance(image, MetaTensor) else "input"
        for message in contract_deviations(image, self.contract):
            logger.warning(f"{source}: {message}")
        return image


class CheckInputContractd(MapTransform):
    """Dictionary version of :class:`CheckInputContract`."""

    def __init__(self, keys: KeysCollection, contract: dict, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.checker = CheckInputContract(contract)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.checker(d[key])
        return d
