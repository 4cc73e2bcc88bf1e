"""Spatial transforms that MONAI provides but that fail in some of the places medfm bundles run."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.transforms import Spacingd

__all__ = ["ResampleToSpacingd"]


class ResampleToSpacingd(Spacingd):
    """MONAI's ``Spacingd`` (same arguments, same inverse) that leaves other ``<key>_*`` entries alone.

    In monai 1.6.1, ``Spacingd`` updates every dictionary entry whose name starts with
    ``"<key>_"`` as if it were a meta dict once a NIfTI image is resampled. MONAI Label puts the
    input's path in ``image_path`` as a string, so ``Spacingd`` raises ``AttributeError`` on every
    /infer request. Entries that are not dicts are set aside during the call and put back after;
    the array counterpart is MONAI's ``Spacing``, which has no such problem.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None) -> dict[Hashable, torch.Tensor]:
        prefixes = tuple(f"{key}_" for key in self.keys)
        set_aside = {name: value for name, value in data.items()
                     if isinstance(name, str) and name.startswith(prefixes) and not isinstance(value, dict)}
        result = super().__call__({name: value for name, value in data.items() if name not in set_aside}, lazy=lazy)
        result.update(set_aside)
        return result
