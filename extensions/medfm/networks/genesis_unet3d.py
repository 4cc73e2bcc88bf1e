"""The Models Genesis 3D U-Net (Zhou et al., MICCAI 2019), key-compatible with the authors' release.

Module names and shapes follow the published ``Genesis_Chest_CT.pt`` state dict (106 keys,
19,073,665 parameters), so that file loads with ``strict=True`` after :func:`checkpoint_filter_fn`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .layers import adapt_input_channels

__all__ = ["ContBatchNorm3d", "GenesisUNet3D", "checkpoint_filter_fn"]

#: Channel width of the first encoder convolution; every other width is a power-of-two multiple.
BASE_WIDTH = 32
NORMS = ("cont_batch", "batch")
FIRST_CONV = "down_tr64.ops.0.conv1.weight"


class ContBatchNorm3d(nn.modules.batchnorm._BatchNorm):
    """Batch norm that normalises with the current batch's statistics in train *and* eval mode.

    This is how the upstream model was trained and evaluated, so outputs depend on the other
    samples in the batch. Running statistics (momentum 0.1, eps 1e-5) are updated in train mode
    only; upstream's ``ContBatchNorm3d`` updates them in eval mode too (it always calls
    ``F.batch_norm`` in training form). Outputs are the same either way, because both normalise
    with the batch's statistics; only the running statistics an evaluation leaves behind differ,
    and here evaluating never changes the weights, which lets the standard ``nn.BatchNorm3d`` mode
    reuse the checkpoint deterministically.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected a 5D (N, C, H, W, D) input, got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        update_stats = self.training and self.track_running_stats
        return F.batch_norm(
            input,
            self.running_mean if update_stats else None,
            self.running_var if update_stats else None,
            self.weight,
            self.bias,
            True,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )


class _ConvNormAct(nn.Module):
    """Conv3d(k3, p1) -> norm -> ReLU with the upstream attribute names ``conv1`` and ``bn1``."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = ContBatchNorm3d(out_channels) if norm == "cont_batch" else nn.BatchNorm3d(out_channels)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.bn1(self.conv1(x)))


def _two_convs(in_channels: int, mid_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        _ConvNormAct(in_channels, mid_channels, norm), _ConvNormAct(mid_channels, out_channels, norm)
    )


class _EncoderLevel(nn.Module):
    """Two convolutions; the 2x max-pool that follows is applied by the caller (not at the bottom)."""

    def __init__(self, in_channels: int, depth: int, norm: str) -> None:
        super().__init__()
        width = BASE_WIDTH * 2**depth
        self.ops = _two_convs(in_channels, width, 2 * width, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops(x)


class _DecoderLevel(nn.Module):
    """Transposed-conv 2x upsampling, concatenation [upsampled, skip], two convolutions."""

    def __init__(self, in_channels: int, skip_channels: int, depth: int, norm: str) -> None:
        super().__init__()
        width = BASE_WIDTH * 2 ** (depth + 1)
        self.up_conv = nn.ConvTranspose3d(in_channels, in_channels, kernel_size=2, stride=2)
        self.ops = _two_convs(in_channels + skip_channels, width, width, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat((self.up_conv(x), skip), dim=1))


class _OutputHead(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.final_conv = nn.Conv3d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_conv(x)


class GenesisUNet3D(nn.Module):
    """Models Genesis 3D U-Net: four encoder levels (64, 128, 256, 512 channels), three decoder levels.

    Args:
        in_channels: input channels (upstream: 1, a CT or MRI volume scaled to [0, 1]).
        out_channels: output channels (upstream: 1, the restored volume).
        norm: ``"cont_batch"`` reproduces upstream (batch statistics even in eval mode);
            ``"batch"`` is standard batch norm (running statistics in eval mode, deterministic).
        output_activation: ``"sigmoid"`` (upstream, restoration in [0, 1]), ``"softmax"`` (over
            channels) or ``None`` for logits, e.g. when fine-tuning with a loss that applies its own.

    Input ``(N, in_channels, H, W, D)`` with H, W and D multiples of 8 (upstream cubes are
    64x64x32 in x, y, z order); output ``(N, out_channels, H, W, D)``.

    Example::

        net = GenesisUNet3D()
        restored = net(torch.rand(2, 1, 64, 64, 32))            # (2, 1, 64, 64, 32)
        skips, bottleneck = net.encode(torch.rand(2, 1, 64, 64, 32))
        bottleneck.shape                                          # (2, 512, 8, 8, 4)
    """

    #: Channels of the bottleneck (1/8 resolution) features, the per-volume embedding size.
    BOTTLENECK_CHANNELS = 512

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        norm: str = "cont_batch",
        output_activation: str | None = "sigmoid",
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if output_activation not in ("sigmoid", "softmax", None):
            raise ValueError(f"output_activation must be 'sigmoid', 'softmax' or None, got {output_activation!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm = norm
        self.output_activation = output_activation

        self.down_tr64 = _EncoderLevel(in_channels, 0, norm)
        self.down_tr128 = _EncoderLevel(64, 1, norm)
        self.down_tr256 = _EncoderLevel(128, 2, norm)
        self.down_tr512 = _EncoderLevel(256, 3, norm)
        self.up_tr256 = _DecoderLevel(512, 256, 2, norm)
        self.up_tr128 = _DecoderLevel(256, 128, 1, norm)
        self.up_tr64 = _DecoderLevel(128, 64, 0, norm)
        self.out_tr = _OutputHead(64, out_channels)

    @staticmethod
    def check_input_size(x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is ``(N, C, H, W, D)`` with H, W, D multiples of 8."""
        if x.dim() != 5:
            raise ValueError("GenesisUNet3D expects a 5D (N, C, H, W, D) tensor, got shape " + str(x.shape))
        for size in x.shape[2:]:
            if size % 8 != 0:  # three 2x max-pools (a literal: TorchScript cannot read module globals)
                raise ValueError(
                    "GenesisUNet3D needs spatial sizes divisible by 8 (three 2x poolings), got "
                    + str(x.shape[2:]) + "; pad or crop first (e.g. monai.transforms.DivisiblePad(k=8))"
                )

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Run the encoder only.

        Returns ``(skips, bottleneck)``: skips at full, 1/2 and 1/4 resolution with 64, 128 and
        256 channels, and the 512-channel bottleneck at 1/8 resolution (8x8x4 for a 64x64x32 cube).
        """
        self.check_input_size(x)
        skip64 = self.down_tr64(x)
        skip128 = self.down_tr128(F.max_pool3d(skip64, 2))
        skip256 = self.down_tr256(F.max_pool3d(skip128, 2))
        bottleneck = self.down_tr512(F.max_pool3d(skip256, 2))
        return [skip64, skip128, skip256], bottleneck

    def decode(self, skips: list[torch.Tensor], bottleneck: torch.Tensor) -> torch.Tensor:
        """Decoder and output head applied to :meth:`encode`'s results."""
        skip64, skip128, skip256 = skips
        x = self.up_tr256(bottleneck, skip256)
        x = self.up_tr128(x, skip128)
        x = self.up_tr64(x, skip64)
        out = self.out_tr(x)
        if self.output_activation == "sigmoid":
            return torch.sigmoid(out)
        if self.output_activation == "softmax":
            return torch.softmax(out, dim=1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips, bottleneck = self.encode(x)
        return self.decode(skips, bottleneck)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The 512-channel bottleneck ``(N, 512, H/8, W/8, D/8)`` from the encoder alone (embeddings: no decoder)."""
        return self.encode(x)[1]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 512)``: the bottleneck averaged over space, the vector ``medfm embed`` writes for one window."""
        return self.forward_features(x).mean(dim=(2, 3, 4))

    def forward_with_bottleneck(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"restored": output, "bottleneck": 512-channel 1/8-resolution features}`` in one pass."""
        skips, bottleneck = self.encode(x)
        return {"restored": self.decode(skips, bottleneck), "bottleneck": bottleneck}


def checkpoint_filter_fn(checkpoint: Mapping[str, object], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Turn a checkpoint in the authors' layouts into a :class:`GenesisUNet3D` state dict.

    Accepts a plain state dict or ``{"state_dict": ..., "optimizer_state_dict": ..., "epoch": ...}``
    as written by the upstream trainer, with or without the ``module.`` prefix of
    ``nn.DataParallel``; everything that is not a model tensor (optimizer state, epoch) is dropped.
    Given ``model``, the first convolution is adapted to its input-channel count.
    """
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError("checkpoint holds no state dict (expected a mapping of tensors or {'state_dict': ...})")
    converted = {key.removeprefix("module."): value for key, value in state.items() if isinstance(value, torch.Tensor)}
    if not converted:
        raise ValueError("checkpoint state dict holds no tensors")
    if model is not None and FIRST_CONV in converted:
        converted = adapt_input_channels(converted, model.state_dict()[FIRST_CONV].shape[1], key=FIRST_CONV)
    return converted
