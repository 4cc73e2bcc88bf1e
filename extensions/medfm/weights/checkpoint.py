"""Reading checkpoints without executing code from them."""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightsError, first_line
from ..io.atomic import atomic_path

__all__ = ["load_checkpoint", "save_state_dict"]

_GLOBAL_NAME = re.compile(r"GLOBAL ([\w.]+?)\.?(?:\s|$)")
#: Most distinct foreign classes one checkpoint may name before its conversion is abandoned.
_MAX_STAND_INS = 64


def load_checkpoint(path: str | os.PathLike, strip_objects: bool = False) -> Any:
    """Load a ``.pt``/``.pth`` (zip or legacy format) with ``weights_only=True``, or a ``.safetensors``.

    A file that needs full unpickling (pickled classes or callables) is refused, never executed.
    With ``strip_objects``, such a file is still read by the ``weights_only`` unpickler, but every
    foreign class it names is bound to an inert stand-in that only stores its arguments; the
    stand-ins are then dropped, so only tensors and plain values come back (an mmcv ``meta`` with
    a config object, numpy arrays in training state...). Names in modules that torch blocks
    outright (``os``, ``subprocess``, ...) are refused even then.
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
    stand_ins: dict[str, type] = {}
    while True:
        try:
            with torch.serialization.safe_globals([(cls, name) for name, cls in stand_ins.items()]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            names = [_refused_global(path, error, strip_objects, len(stand_ins))]
            if not stand_ins and zipfile.is_zipfile(path):  # all names at once (read, not unpickled): one more load
                names += torch.serialization.get_unsafe_globals_in_checkpoint(path)
            stand_ins.update((name, type(name.rsplit(".", 1)[-1], (_InertObject,), {"__module__": "medfm.inert"}))
                             for name in names)
            continue
        except (RuntimeError, EOFError, ValueError, OSError) as error:
            raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({first_line(error)})") from None
        if stand_ins:
            logging.getLogger(__name__).warning(
                f"{path}: kept only tensors and plain values; dropped pickled objects of {', '.join(sorted(stand_ins))}")
            return _without_stand_ins(checkpoint)
        return checkpoint


class _InertObject:
    """Takes the place of a class named in a checkpoint: stores what it is given, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _refused_global(path: Path, error: pickle.UnpicklingError, strip_objects: bool, stripped: int) -> str:
    """The global named by a ``weights_only`` refusal, when it may get a stand-in; else the error to raise."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reference = next((line for line in lines if "GLOBAL" in line), None)
    if reference is None:  # not a pickle of tensors at all (garbage, truncated, another format)
        detail = next((line for line in lines if line.startswith("Unsupported")), lines[-1] if lines else "")
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({detail})") from None
    match = _GLOBAL_NAME.search(reference)
    if "is blocked" in reference or match is None:
        raise WeightsError(f"{path}: refused: the checkpoint would call {match.group(1) if match else 'a blocked global'} "
                           "when unpickled (a module torch never allows); it was not unpickled") from None
    if not strip_objects:
        raise WeightsError(
            f"{path}: refused: the checkpoint holds pickled Python objects beyond tensors and plain "
            f"containers ({reference.rstrip('.')}); it was not unpickled. 'medfm weights import --strip_objects' "
            "reads only its tensors (the objects become inert placeholders and are dropped; none of their code runs)"
        ) from None
    if stripped >= _MAX_STAND_INS:
        raise WeightsError(f"{path}: refused: names more than {_MAX_STAND_INS} foreign classes; not a weights file")
    return match.group(1)


def _without_stand_ins(value: Any) -> Any:
    """``value`` with every stand-in (and every container left empty by removing them) dropped."""
    if isinstance(value, _InertObject):
        return None
    if isinstance(value, Mapping):
        kept = {key: _without_stand_ins(item) for key, item in value.items()}
        return {key: item for key, item in kept.items() if item is not None or value[key] is None}
    if isinstance(value, (list, tuple)):
        return type(value)(_without_stand_ins(item) for item in value if not isinstance(item, _InertObject))
    return value


def save_state_dict(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write a state dict atomically: a temporary file in the same folder, then a rename."""
    with atomic_path(path) as temporary:
        torch.save(state_dict, temporary)
    return Path(path)
