"""Inferers for networks that return several named outputs in one pass."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.utils import fall_back_tuple

from ..transforms.contract import logger as contract_logger


def _call_as_forward(wrapper: torch.nn.Module, module: torch.nn.Module, method: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``wrapper`` (DDP, DataParallel) with ``method`` in place of ``module.forward``."""
    module.forward = method
    try:
        return wrapper(*args, **kwargs)
    finally:
        del module.forward


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
        # a wrapper's own forward must run (DDP synchronises gradients only for calls through it),
        # so the method stands in for the module's forward while the wrapper is called
        call = (lambda *a, **k: _call_as_forward(network, module, method, *a, **k)) if module is not network else method

        def predictor(window: torch.Tensor, *a: Any, **k: Any) -> Any:
            outputs = call(window, *a, **k)
            if isinstance(outputs, Mapping):
                names[:] = list(outputs)
                return tuple(outputs.values())
            return outputs

        # monai 1.6.1's sliding window sorts dict outputs by key and mis-sizes its weight maps when
        # a lower-resolution output sorts first; a tuple keeps the method's full-resolution-first order
        padded, before = self._padded_to_window(inputs)
        result = self.inferer(padded, predictor, *args, **kwargs)
        if before is not None:
            result = tuple(_crop_to_input(r, padded.shape[2:], inputs.shape[2:], before) for r in result) \
                if isinstance(result, tuple) else _crop_to_input(result, padded.shape[2:], inputs.shape[2:], before)
        return dict(zip(names, result)) if names else result

    def _padded_to_window(self, inputs: torch.Tensor) -> tuple[torch.Tensor, list[int] | None]:
        """The input padded up to the sliding window (as MONAI pads it) and the padding before each axis.

        MONAI pads an input smaller than ``roi_size`` itself and crops every output back by the
        same voxel counts scaled to the output's resolution; at 1/8 resolution that crop rounds
        to nothing for a scan of 8 slices or fewer (a 12-voxel pad is 1.5 cells), and the
        bottleneck pooled over an empty map is NaN. Padding here and cropping with
        :func:`_crop_to_input` keeps every cell that covers the scan.
        """
        roi = getattr(self.inferer, "roi_size", None)
        if roi is None:
            return inputs, None
        spatial = inputs.shape[2:]
        roi = fall_back_tuple(roi, spatial)
        missing = [max(int(r) - n, 0) for r, n in zip(roi, spatial)]
        if not any(missing):
            return inputs, None
        source = inputs.meta.get("filename_or_obj", "input") if isinstance(inputs, MetaTensor) else "input"
        source = ", ".join(map(str, source)) if isinstance(source, (list, tuple)) else source  # a collated batch
        shown, wanted = (" x ".join(str(int(n)) for n in size) for size in (spatial, roi))
        contract_logger.warning(f"{source}: voxel grid {shown} is smaller than the {wanted} window the network was "
                                "trained on; it is padded, so part of what the network sees is padding")
        before = [m // 2 for m in missing]
        pad = [p for b, m in reversed(list(zip(before, missing))) for p in (b, m - b)]
        mode = str(getattr(self.inferer, "padding_mode", "constant"))
        value = float(getattr(self.inferer, "cval", 0.0))
        padded = torch.nn.functional.pad(inputs, pad, mode=mode, value=value) if mode == "constant" \
            else torch.nn.functional.pad(inputs, pad, mode=mode)
        return padded, before


def _crop_to_input(output: torch.Tensor, padded: Sequence[int], original: Sequence[int], before: Sequence[int]) -> torch.Tensor:
    """``output`` of a padded input cut to the cells that cover the original input, at the output's own scale."""
    window = []
    for size, padded_size, original_size, start in zip(output.shape[2:], padded, original, before):
        scale = size / padded_size
        window.append(slice(math.floor(start * scale), max(math.ceil((start + original_size) * scale), math.floor(start * scale) + 1)))
    return output[(slice(None), slice(None), *window)]


class FeatureTapInferer(Inferer):
    """Run a network once on the whole input and return named intermediate outputs beside its own.

    For networks built elsewhere (MONAI's ``ResNet``) whose ``forward`` returns only the final
    output: forward hooks on the named submodules capture their outputs, flattened per item,
    e.g. ``taps={"embedding": "avgpool"}`` gives the 512-d pooled features of a ResNet-18.

    Args:
        taps: output name -> dotted submodule name (``network.get_submodule``).
        output_key: name for the network's own output; ``None`` leaves it out (when the tapped
            features are all that is wanted).
    """

    def __init__(self, taps: Mapping[str, str], output_key: str | None = "pred") -> None:
        super().__init__()
        self.taps = dict(taps)
        self.output_key = output_key

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> dict:
        module = getattr(network, "module", network)
        captured: dict[str, torch.Tensor] = {}
        hooks = [
            module.get_submodule(target).register_forward_hook(
                lambda _module, _inputs, output, name=name: captured.__setitem__(name, output.flatten(1)))
            for name, target in self.taps.items()
        ]
        try:
            output = network(inputs, *args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        return {**({self.output_key: output} if self.output_key else {}), **captured}


class TiledEmbeddingInferer(Inferer):
    """Embed a volume larger than ``max_size`` as the voxel-weighted mean of the embeddings of its tiles.

    For whole-volume networks that end in global average pooling (VDT's ResNet): their memory grows
    with the volume (a 512x512x300 CT needs several GiB of activations), so a volume larger than
    ``max_size`` along any axis is cut into the fewest nearly equal tiles that fit, each tile is
    embedded by ``inferer``, and the embeddings are averaged with the tiles' voxel counts as
    weights, which approximates the global average of the whole feature map (tile borders aside).
    Volumes that fit go through ``inferer`` whole, unchanged.

    Args:
        inferer: gives the embedding of one tile, a tensor ``(N, C)`` or a mapping holding one.
        max_size: the largest tile, in voxels per spatial axis.
        output_key: for mapping outputs, the key holding the embedding (other keys are dropped when tiling).
    """

    def __init__(self, inferer: Inferer, max_size: Sequence[int], output_key: str | None = None) -> None:
        super().__init__()
        self.inferer = inferer
        self.max_size = [int(n) for n in max_size]
        self.output_key = output_key

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        shape = inputs.shape[2:]
        counts = [math.ceil(n / m) for n, m in zip(shape, self.max_size)]
        if all(count == 1 for count in counts):
            return self.inferer(inputs, network, *args, **kwargs)
        bounds = [[round(i * n / count) for i in range(count + 1)] for n, count in zip(shape, counts)]
        total, voxels = None, 0
        for tile in itertools.product(*(range(count) for count in counts)):
            window = tuple(slice(axis[i], axis[i + 1]) for axis, i in zip(bounds, tile))
            output = self.inferer(inputs[(slice(None), slice(None), *window)], network, *args, **kwargs)
            vector = output[self.output_key] if self.output_key is not None else output
            weight = math.prod(w.stop - w.start for w in window)
            total = vector * weight if total is None else total + vector * weight
            voxels += weight
        mean = total / voxels
        return {self.output_key: mean} if self.output_key is not None else mean
