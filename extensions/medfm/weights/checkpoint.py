"""Reading checkpoints without executing code from them."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightsError, first_line
from ..io.atomic import atomic_path

__all__ = ["sha256_of", "load_checkpoint", "save_state_dict"]


def sha256_of(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_checkpoint(path: str | os.PathLike) -> Any:
    """Load a ``.pt``/``.pth`` (zip or legacy format) with ``weights_only=True``, or a ``.safetensors``.

    A file that needs full unpickling (pickled classes or callables) is refused, never executed.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own error types
            raise WeightsError(f"{path}: not a readable safetensors file ({first_line(error)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reference = next((line for line in lines if "GLOBAL" in line), None)
        if reference is None:  # not a pickle of tensors at all (garbage, truncated, another format)
            detail = next((line for line in lines if line.startswith("Unsupported")), lines[-1] if lines else "")
            raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({detail})") from None
        raise WeightsError(
            f"{path}: refused: the checkpoint holds pickled Python objects beyond tensors and plain "
            f"containers ({reference.rstrip('.')}); it was not unpickled. If you trust its origin, convert "
            "it once to a plain state dict or safetensors in an isolated environment"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({first_line(error)})") from None


def save_state_dict(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write a state dict atomically: a temporary file in the same folder, then a rename."""
    with atomic_path(path) as temporary:
        torch.save(state_dict, temporary)
    return Path(path)
