"""3D ResNet-18 encoder (VDT weights layout) with a U-Net decoder over its five feature maps.

Upstream fine-tunes the VDT-pretrained ResNet for liver (LiTS) and multi-organ (BTCV)
segmentation with a U-Net neck over the encoder's five feature maps and a stride-1 stem. This
network is MONAI's ``ResNet`` with that stem, so the encoder's tensors keep the upstream names
(``conv1``, ``bn1``, ``layer1`` .. ``layer4``): the pretrained weights load by name and only
``decoder`` and ``segmentation_head`` start fresh.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers import Conv
from monai.networks.nets.basic_unet import UpCat
from monai.networks.nets.resnet import ResNetBlock, get_inplanes
from torch import nn

from .vdt_resnet3d import RESNET18_ARGS, VDTResNet3D

__all__ = ["VDTResNetUNet"]


class VDTResNetUNet(VDTResNet3D):
    """U-Net with the VDT 3D ResNet-18 as encoder.

    Encoder feature maps for a (B, C, D, H, W) input: stem (64, full size), stage 1 (64, 1/2),
    stage 2 (128, 1/4), stage 3 (256, 1/8), stage 4 (512, 1/16). Each decoder step upsamples by
    2, concatenates the encoder map of that size and applies two convolutions; a 1x1x1
    convolution gives ``out_channels`` logits at the input size; ``forward_features`` and ``embed``
    give the stage-4 map and its average (no decoder). Spatial sizes must be multiples
    of 16 (pad with ``DivisiblePadd(k=16)``, or use patches of such sizes).

    Args:
        in_channels: input channels (1 for the pretrained weights).
        out_channels: segmentation classes, background included.
        decoder_channels: output channels of the four decoder steps, deepest first.
        norm: decoder normalisation (the encoder keeps its batch norm, as pretrained).
        dropout: decoder dropout.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2,
                 decoder_channels: Sequence[int] = (256, 128, 64, 32), norm: str | tuple = "batch",
                 dropout: float = 0.0) -> None:
        if len(decoder_channels) != 4:
            raise ValueError(f"decoder_channels needs 4 entries (one per upsampling step), got {decoder_channels}")
        super().__init__(ResNetBlock, [2, 2, 2, 2], get_inplanes(),
                         **{**RESNET18_ARGS, "n_input_channels": in_channels, "conv1_t_stride": 1},
                         feed_forward=False)
        self.in_channels = in_channels
        encoder_channels = (64, 64, 128, 256, 512)  # stem, then stages 1-4
        inputs = (encoder_channels[-1], *decoder_channels[:-1])
        skips = encoder_channels[-2::-1]
        self.decoder = nn.ModuleList(
            UpCat(3, upsampled, skip, out, act="relu", norm=norm, bias=False, dropout=dropout, upsample="deconv")
            for upsampled, skip, out in zip(inputs, skips, decoder_channels)
        )
        self.segmentation_head = Conv[Conv.CONV, 3](decoder_channels[-1], out_channels, kernel_size=1)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five encoder feature maps, full resolution first."""
        stem = self.act(self.bn1(self.conv1(x)))
        features = [stem, self.layer1(self.maxpool(stem))]
        for stage in (self.layer2, self.layer3, self.layer4):
            features.append(stage(features[-1]))
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(size % 16 for size in x.shape[2:]):
            raise ValueError(f"VDTResNetUNet needs spatial sizes divisible by 16, got {tuple(x.shape[2:])}")
        *skips, x = self.encode(x)
        for step, skip in zip(self.decoder, reversed(skips)):
            x = step(x, skip)
        return self.segmentation_head(x)

