"""Helpers shared by the ``PrepareBatch`` classes of the pre-training workflows."""

from __future__ import annotations

import torch
from monai.data import MetaTensor

__all__ = ["plain_tensor"]


def plain_tensor(value, device: str | torch.device | None = None, non_blocking: bool = False) -> torch.Tensor:
    """``value`` as a plain tensor on ``device``.

    Pre-training crops carry no geometry worth tracking, and MetaTensor bookkeeping on every
    operation of the network costs time.
    """
    value = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)
    return value.to(device=device, non_blocking=non_blocking)
