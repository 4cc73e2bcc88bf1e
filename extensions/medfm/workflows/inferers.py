"""Inferers for networks that return several named outputs in one pass."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.inferers import Inferer


class MethodInferer(Inferer):
    """Run another inferer on a named method of the network instead of its ``forward``.

    MONAI evaluators call ``inferer(inputs, network)`` and need ``network`` to be the module (for
    ``eval()`` and device moves), so a network's multi-output method, such as
    ``GenesisUNet3D.forward_with_bottleneck`` returning ``{"restored": ..., "bottleneck": ...}``,
    is selected here. With a ``SlidingWindowInferer`` every output is stitched at its own scale
    (the 1/8-resolution bottleneck too).

    Args:
        inferer: the inferer to run, e.g. ``SlidingWindowInferer(roi_size=(64, 64, 32))``.
        method: name of the network method to call per window or batch.
    """

    def __init__(self, inferer: Inferer, method: str) -> None:
        super().__init__()
        self.inferer = inferer
        self.method = method

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        module = getattr(network, "module", network)  # unwrap DataParallel / DDP
        method = getattr(module, self.method, None)
        if not callable(method):
            raise AttributeError(f"{type(module).__name__} has no method {self.method!r}")
        names: list[str] = []

        def predictor(window: torch.Tensor, *a: Any, **k: Any) -> Any:
            outputs = method(window, *a, **k)
            if isinstance(outputs, Mapping):
                names[:] = list(outputs)
                return tuple(outputs.values())
            return outputs

        # monai 1.6.1's sliding window sorts dict outputs by key and mis-sizes its weight maps when
        # a lower-resolution output sorts first; a tuple keeps the method's full-resolution-first order
        result = self.inferer(inputs, predictor, *args, **kwargs)
        return dict(zip(names, result)) if names else result
