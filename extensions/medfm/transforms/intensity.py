"""Intensity scaling per modality, recorded so that outputs can be mapped back to input units."""

from __future__ import annotations

import logging
import re
from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends

__all__ = ["resolve_modality", "ModalityIntensity", "ModalityIntensityd", "RestoreIntensity", "RestoreIntensityd",
           "INTENSITY_RANGE_KEY"]

# the guess is reported with the input-contract deviations, which ``medfm infer`` prints
logger = logging.getLogger("medfm.contract")

#: Meta key holding (low, high): input value = low + scaled value * (high - low).
INTENSITY_RANGE_KEY = "intensity_range"
#: Below this minimum (HU) an image without a declared modality is taken for CT (air is -1000 HU).
CT_AIR_THRESHOLD = -500.0


#: The lowest value a CT in Hounsfield units holds (air is -1000; scanners store down to -1024 and pad below).
CT_LOWEST_HU = -3024.0
_MR_WORDS = {"MR", "MRI", "T1", "T2", "T1W", "T2W", "FLAIR", "DWI", "PD"}


def _described_modality(image: torch.Tensor) -> str | None:
    """CT or MR when the file's own description (NIfTI ``descrip``, DICOM SeriesDescription) says which."""
    meta = image.meta if isinstance(image, MetaTensor) else {}
    text = " ".join(str(meta.get(key, "") or "") for key in ("descrip", "SeriesDescription"))
    words = set(re.findall(r"[A-Z0-9]+", text.upper()))
    if "CT" in words and not words & _MR_WORDS:
        return "CT"
    if words & _MR_WORDS and "CT" not in words:
        return "MR"
    return None


def _guessed_modality(image: torch.Tensor) -> tuple[str, str]:
    """CT or MR from the intensities alone, and the evidence, for a scan that declares neither."""
    low = float(image.min())
    if low < CT_AIR_THRESHOLD:
        return "CT", f"values down to {low:g}, as air in Hounsfield units"
    if low < 0 and low >= CT_LOWEST_HU and bool(torch.all(image == torch.round(image))):
        return "CT", f"negative integer values (down to {low:g}), as Hounsfield units have; MR magnitudes are never negative"
    return "MR", f"no values like Hounsfield units (minimum {low:g}{', not integers' if low < 0 else ''})"


def resolve_modality(image: torch.Tensor, modality: str = "auto") -> str:
    """``"CT"`` or ``"MR"``: the given one, else the DICOM Modality, else the file's description, else a guess
    from the intensities (:func:`_guessed_modality`), which is logged with its evidence and the flag that fixes it."""
    if modality != "auto":
        return modality.upper()
    declared = str(image.meta.get("Modality", "")).upper() if isinstance(image, MetaTensor) else ""
    if declared in ("CT", "MR"):
        return declared
    source = image.meta.get("filename_or_obj", "input") if isinstance(image, MetaTensor) else "input"
    described = _described_modality(image)
    if described is not None:
        logger.warning("%s: no DICOM modality; treated as %s, as its description says; if that is wrong pass "
                       "--modality CT or --modality MR", source, described)
        return described
    guessed, evidence = _guessed_modality(image)
    logger.warning("%s: no modality given, treated as %s (%s); if that is wrong pass --modality %s",
                   source, guessed, evidence, "MR" if guessed == "CT" else "CT")
    return guessed


class ModalityIntensity(Transform):
    """Scale to [0, 1] as the model was pre-trained: CT through a HU window (clipped), MR per-image min-max.

    Records ``(low, high)`` in ``meta["intensity_range"]`` so that :class:`RestoreIntensity` can map a
    restored image back to HU (CT, within the window) or to the input's own MR units.
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, hu_window: Sequence[float] = (-1000.0, 1000.0)) -> None:
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))

    def __call__(self, image: torch.Tensor, modality: str = "auto") -> torch.Tensor:
        modality = resolve_modality(image, modality)
        values = image.float()
        if modality == "CT":
            low, high = self.hu_window
        else:
            low, high = float(values.min()), float(values.max())
        scaled = ((values - low) / max(high - low, 1e-8)).clamp(0.0, 1.0)
        if isinstance(scaled, MetaTensor):
            scaled.meta[INTENSITY_RANGE_KEY] = (low, high)
        return scaled


class ModalityIntensityd(MapTransform):
    """Dictionary version: the modality comes from ``modality_key`` of each item when present and not empty, else
    ``modality``."""

    def __init__(self, keys: KeysCollection, modality: str = "auto", modality_key: str | None = "modality",
                 hu_window: Sequence[float] = (-1000.0, 1000.0), allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modality = modality
        self.modality_key = modality_key
        self.scaler = ModalityIntensity(hu_window)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        given = str(d.get(self.modality_key) or "") if self.modality_key else ""
        modality = given or self.modality  # an empty cell of a table's modality column means "not given"
        for key in self.key_iterator(d):
            d[key] = self.scaler(d[key], modality)
        return d


class RestoreIntensity(Transform):
    """Map [0, 1] values back to input units with the ``(low, high)`` :class:`ModalityIntensity` recorded."""

    backend = [TransformBackends.TORCH]

    def __call__(self, image: torch.Tensor, intensity_range: Sequence[float]) -> torch.Tensor:
        low, high = (float(v) for v in intensity_range)
        return image * (high - low) + low


class RestoreIntensityd(MapTransform):
    """Dictionary version; the range is read from the metadata of ``source_key`` (the scaled input)."""

    def __init__(self, keys: KeysCollection, source_key: str = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.source_key = source_key
        self.restorer = RestoreIntensity()

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        source = d[self.source_key]
        if not isinstance(source, MetaTensor) or INTENSITY_RANGE_KEY not in source.meta:
            raise ValueError(f"RestoreIntensityd: '{self.source_key}' was not scaled by ModalityIntensity(d)")
        for key in self.key_iterator(d):
            d[key] = self.restorer(d[key], source.meta[INTENSITY_RANGE_KEY])
        return d
