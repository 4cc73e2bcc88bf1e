"""Mixed precision for the bundles' trainers: on CUDA only, in bfloat16 where the GPU has it."""

from __future__ import annotations

import torch

from ..errors import MedfmError

__all__ = ["autocast_kwargs", "mixed_precision"]


def mixed_precision(amp: bool, device: str | torch.device) -> bool:
    """``amp``, checked: asking for it on the CPU is an error, since ``torch.autocast("cuda")`` there does nothing."""
    if amp and torch.device(device).type != "cuda":
        raise MedfmError(f"--amp True needs a CUDA device; this run is on {device} (mixed precision is off on the CPU)")
    return bool(amp)


def autocast_kwargs(device: str | torch.device) -> dict:
    """``torch.autocast`` arguments: bfloat16 where the GPU supports it (its range needs no loss scaling), else float16."""
    device = torch.device(device)
    bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return {"dtype": torch.bfloat16 if bf16 else torch.float16}
