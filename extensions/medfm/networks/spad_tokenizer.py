"""SPAD-VT: the spacing-adaptive visual tokenizer of PUMIT (Luo et al., arXiv 2312.07630).

A convolutional autoencoder with total stride 16 (one code per SPAD-ViT patch) and a soft vector
quantiser: each position's code is a softmax mixture of a 1024-entry codebook. Its code
distributions are the targets of SPAD-ViT's masked image modelling.

Spacing adaptation follows one rule for every layer: an input with ``aniso_d`` a is treated as if
it had been nearest-upsampled ``2**a`` times along depth. A layer that would still downsample that
virtual depth (``pending = a - depth halvings so far > 0``) shrinks its depth stride by
``2**pending`` and sums its depth taps in contiguous groups to match (all of them, with no depth
padding, when the stride reaches 1), so 3x3x3 kernels become 1x3x3 on slices that are still
coarser than the in-plane grid. Inputs and outputs are MONAI-style ``(N, C, H, W, D)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import adapt_input_channels
from .spad_vit import batch_aniso_d, check_token_multiple, reduce_kernel

__all__ = ["SpadTokenizer", "AdaptiveConv3d", "checkpoint_filter_fn"]


class AdaptiveConv3d(nn.Module):
    """A 3D convolution (or transposed convolution) whose depth stride and taps follow ``aniso_d``.

    ``level``: depth halvings of the full-resolution grid before this layer (for a transposed
    convolution: of its output).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, level: int = 0,
                 transposed: bool = False) -> None:
        super().__init__()
        self.stride, self.level, self.transposed = stride, level, transposed
        self.padding = (kernel_size - 1) // 2 if stride == 1 else 0
        conv = nn.ConvTranspose3d if transposed else nn.Conv3d
        self.conv = conv(in_channels, out_channels, kernel_size, stride=stride, padding=self.padding)

    def depth_stride(self, aniso_d: int) -> int:
        pending = max(aniso_d - self.level, 0)
        return max(self.stride >> pending, 1)

    def forward(self, x: torch.Tensor, aniso_d: int) -> torch.Tensor:
        weight = self.conv.weight
        depth_stride, depth_padding = self.stride, self.padding
        if aniso_d > self.level:  # the virtual depth is still finer than the real one here
            depth_stride = self.depth_stride(aniso_d)
            taps = 1 if depth_stride == 1 else weight.shape[-1] * depth_stride // self.stride
            weight, depth_padding = reduce_kernel(weight, 4, taps), 0
        stride = (self.stride, self.stride, depth_stride)
        padding = (self.padding, self.padding, depth_padding)
        if self.transposed:
            return F.conv_transpose3d(x, weight, self.conv.bias, stride=stride, padding=padding)
        return F.conv3d(x, weight, self.conv.bias, stride=stride, padding=padding)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of ``(N, C, ...)`` feature maps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class _Stage(nn.Module):
    """Adaptive conv, then norm and activation."""

    def __init__(self, conv: AdaptiveConv3d, norm: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.conv, self.norm, self.act = conv, norm, act

    def forward(self, x: torch.Tensor, aniso_d: int) -> torch.Tensor:
        return self.act(self.norm(self.conv(x, aniso_d)))


def _conv3_stage(channels: int, level: int, groups: int) -> _Stage:
    return _Stage(AdaptiveConv3d(channels, channels, 3, level=level), nn.GroupNorm(groups, channels), nn.LeakyReLU(0.01))


class SpadTokenizer(nn.Module):
    """Spacing-adaptive visual tokenizer with a soft vector quantiser.

    Args:
        in_channels: image channels (upstream: 3, a gray image repeated; this project: 1).
        channels: widths after the k4s4, k2s2, k2s2 downsampling convs (upstream 128, 256, 512).
        codebook_size, code_dim: number and width of the codes (1024, 512; ``code_dim`` is the
            last encoder width).
        groups: GroupNorm groups of the 3x3x3 stages.

    Inputs are images in [-1, 1], ``(N, C, H, W, D)`` (2D: D = 1 or ``(N, C, H, W)``) with H and W
    multiples of 16 and D of the depth stride ``max(16 >> aniso_d, 1)``.
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (128, 256, 512), codebook_size: int = 1024,
                 groups: int = 8) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.in_channels = in_channels
        self.encoder = nn.ModuleList([
            _Stage(AdaptiveConv3d(in_channels, c1, 4, stride=4, level=0), ChannelLayerNorm(c1), nn.GELU()),
            _Stage(AdaptiveConv3d(c1, c2, 2, stride=2, level=2), ChannelLayerNorm(c2), nn.GELU()),
            _Stage(AdaptiveConv3d(c2, c3, 2, stride=2, level=3), ChannelLayerNorm(c3), nn.GELU()),
            _conv3_stage(c3, 4, groups), _conv3_stage(c3, 4, groups),
        ])
        self.quantize_logits = nn.Linear(c3, codebook_size)
        self.codebook = nn.Embedding(codebook_size, c3)
        self.decoder = nn.ModuleList([
            _conv3_stage(c3, 4, groups), _conv3_stage(c3, 4, groups),
            _Stage(AdaptiveConv3d(c3, c2, 2, stride=2, level=3, transposed=True), nn.Identity(), nn.Identity()),
            _conv3_stage(c2, 3, groups),
            _Stage(AdaptiveConv3d(c2, c1, 2, stride=2, level=2, transposed=True), nn.Identity(), nn.Identity()),
            _conv3_stage(c1, 2, groups),
            _Stage(AdaptiveConv3d(c1, in_channels, 4, stride=4, level=0, transposed=True), nn.Identity(), nn.Identity()),
        ])

    @staticmethod
    def _as_volume(x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(-1) if x.ndim == 4 else x

    def code_probabilities(self, x: torch.Tensor, spacing: torch.Tensor | Sequence[float] | None = None,
                           aniso_d: int | None = None) -> tuple[torch.Tensor, tuple[int, int, int], int]:
        """Soft code distributions ``(N, L, codebook_size)`` in SPAD-ViT's token order (depth, then
        H, then W), the ``(d, h, w)`` token grid, and the aniso_d used."""
        aniso = batch_aniso_d(x, spacing, aniso_d)
        z = self._as_volume(x)
        check_token_multiple(z, aniso)  # one code per SPAD-ViT token
        for stage in self.encoder:
            z = stage(z, aniso)
        grid = (z.shape[4], z.shape[2], z.shape[3])
        tokens = z.permute(0, 4, 2, 3, 1).flatten(1, 3)  # (N, d*h*w, C), depth first like SpadViT
        return self.quantize_logits(tokens).softmax(-1), grid, aniso

    def decode(self, probabilities: torch.Tensor, grid: tuple[int, int, int], aniso_d: int) -> torch.Tensor:
        """Reconstruct ``(N, C, H, W, D)`` from code distributions ``(N, L, codebook_size)``."""
        z = (probabilities @ self.codebook.weight).unflatten(1, grid).permute(0, 4, 2, 3, 1)
        for stage in self.decoder:
            z = stage(z, aniso_d)
        return z

    def forward(self, x: torch.Tensor, spacing: torch.Tensor | Sequence[float] | None = None,
                aniso_d: int | None = None) -> dict[str, torch.Tensor]:
        """``{"reconstruction": same shape as x, "probabilities": (N, L, codebook_size)}``."""
        probabilities, grid, aniso = self.code_probabilities(x, spacing, aniso_d)
        reconstruction = self.decode(probabilities, grid, aniso)
        return {"reconstruction": reconstruction if x.ndim == 5 else reconstruction.squeeze(-1),
                "probabilities": probabilities}

    @staticmethod
    def usage_and_entropy(probabilities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codebook-usage loss ``sum(p_mean * log p_mean)`` (lowest when all codes are used equally) and
        the mean per-token entropy (lowest when each token commits to one code)."""
        log = probabilities.clamp_min(1e-12).log()
        mean = probabilities.flatten(0, -2).mean(0)
        usage = (mean * mean.clamp_min(1e-12).log()).sum()
        entropy = -(probabilities * log).sum(-1).mean()
        return usage, entropy


#: Module paths of the authors' ``SimpleVQTokenizer`` (PUMIT ``pumit/tokenizer/simple.py``, one
#: ``nn.Sequential`` per side; their channel LayerNorm is a Sequential holding the norm at ``.1``)
#: -> this network's.
AUTHORS_MODULES = {
    "quantize.proj": "quantize_logits", "quantize.embedding": "codebook",
    "encoder.0": "encoder.0.conv.conv", "encoder.1.1": "encoder.0.norm",
    "encoder.3": "encoder.1.conv.conv", "encoder.4.1": "encoder.1.norm",
    "encoder.6": "encoder.2.conv.conv", "encoder.7.1": "encoder.2.norm",
    "encoder.9": "encoder.3.conv.conv", "encoder.10": "encoder.3.norm",
    "encoder.12": "encoder.4.conv.conv", "encoder.13": "encoder.4.norm",
    "decoder.0": "decoder.0.conv.conv", "decoder.1": "decoder.0.norm",
    "decoder.3": "decoder.1.conv.conv", "decoder.4": "decoder.1.norm",
    "decoder.6.transposed_conv": "decoder.2.conv.conv",
    "decoder.6.conv.0": "decoder.3.conv.conv", "decoder.6.conv.1": "decoder.3.norm",
    "decoder.7.transposed_conv": "decoder.4.conv.conv",
    "decoder.7.conv.0": "decoder.5.conv.conv", "decoder.7.conv.1": "decoder.5.norm",
    "decoder.8": "decoder.6.conv.conv",
}
_AUTHORS_KEY = re.compile(r"^(?P<module>.+)\.(?P<tensor>weight|bias)$")
OUTPUT_KEYS = ("decoder.6.conv.conv.weight", "decoder.6.conv.conv.bias")


def checkpoint_filter_fn(checkpoint: Mapping, model: SpadTokenizer) -> dict[str, torch.Tensor]:
    """Map the authors' tokenizer checkpoint (or ours) onto ``model``'s keys.

    Accepts their Lightning Fabric file (the tokenizer under ``model``; discriminator and
    optimiser states beside it are ignored), ``{"state_dict": ...}`` or a bare state dict, with or
    without ``module.`` / ``tokenizer.`` prefixes. Their convolutions run on ``(N, C, D, H, W)``,
    so every kernel is moved from ``(kD, kH, kW)`` to this network's ``(kH, kW, kD)``. Their
    tokenizer reads and writes RGB (a gray image repeated): the first kernel is summed over its
    input channels, and a one-channel output is the mean of their three output channels. Any key
    neither network knows is kept, so a strict load reports it.
    """
    state = checkpoint if isinstance(checkpoint, Mapping) else None
    if state is not None:
        state = state.get("state_dict", state.get("model", state))
    if not isinstance(state, Mapping) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("checkpoint holds no state dict (expected the tokenizer's tensors, under 'model' or "
                         "'state_dict' or bare)")
    expected = model.state_dict()
    converted = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = re.sub(r"^(module\.|tokenizer\.)+", "", key)
        match = _AUTHORS_KEY.match(key)
        if key not in expected and match and match["module"] in AUTHORS_MODULES:
            key = f"{AUTHORS_MODULES[match['module']]}.{match['tensor']}"
            if value.ndim == 5:
                value = value.permute(0, 1, 3, 4, 2)
        converted[key] = value
    if "encoder.0.conv.conv.weight" in converted:
        converted = adapt_input_channels(converted, model.in_channels, key="encoder.0.conv.conv.weight")
    weight, bias = (converted.get(key) for key in OUTPUT_KEYS)
    if weight is not None and bias is not None and weight.shape[1] != model.in_channels and model.in_channels == 1:
        converted[OUTPUT_KEYS[0]] = weight.mean(dim=1, keepdim=True)
        converted[OUTPUT_KEYS[1]] = bias.mean(dim=0, keepdim=True)
    return converted
