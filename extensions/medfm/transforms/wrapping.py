"""Shared plumbing of dictionary transforms that delegate to a random array transform."""

from __future__ import annotations

import numpy as np
from monai.transforms import Randomizable

__all__ = ["SeedsWrappedTransform"]


class SeedsWrappedTransform(Randomizable):
    """Mixin: ``set_random_state`` seeds this transform and the array transform in ``self.transform``,
    so one seed makes a dictionary transform reproducible whichever object draws."""

    transform: Randomizable

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.transform.set_random_state(seed, state)
        return self
