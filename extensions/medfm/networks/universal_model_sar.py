"""Universal Model / SAR pre-training network (Zhang et al. 2020, arXiv 2010.06107).

The released ``Universal_model.pt`` holds only the 3D U-Net, key for key the Models Genesis
network, so :class:`GenesisUNet3D` is reused as is and its ``checkpoint_filter_fn`` converts the
authors' file. What the abstract describes beyond the U-Net (a scale classifier and a
modality discriminator behind a gradient-reversal layer) is reconstructed here; the paper's
head designs are unpublished, so these are this project's choices: both heads read the
global-average-pooled 512-channel bottleneck through a two-layer MLP.
"""

from __future__ import annotations

import torch
from torch import nn

from .genesis_unet3d import GenesisUNet3D, checkpoint_filter_fn
from .layers import GradientReversal

__all__ = ["UniversalModelSAR", "checkpoint_filter_fn"]


def _pooled_mlp(in_features: int, hidden: int, classes: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, classes))


class UniversalModelSAR(nn.Module):
    """Genesis U-Net with a scale classifier and an adversarial modality discriminator.

    Args:
        num_scales: crop scales the scale head tells apart.
        num_domains: modalities / sources the discriminator tells apart.
        adversarial_weight: gradient-reversal factor between encoder and discriminator (0: the
            discriminator learns but the encoder ignores it).
        head_hidden: hidden width of both heads.
        norm: U-Net normalisation (``"cont_batch"`` as upstream, or ``"batch"``).

    ``forward(x, clean=None)`` with ``x`` (the corrupted crop) of shape (B, 1, H, W, D), each side
    divisible by 8, returns ``{"restored": (B, 1, H, W, D) in [0, 1], "scale_logits": (B, num_scales),
    "domain_logits": (B, num_domains), "bottleneck": (B, 512, H/8, W/8, D/8)}``. With ``clean``
    (the uncorrupted crop, same shape) the heads classify its encoding instead of ``x``'s, at the
    cost of a second encoder pass.
    ``unet.state_dict()`` is the bundle weight file; ``heads_state_dict()`` the rest.
    """

    def __init__(self, num_scales: int = 3, num_domains: int = 2, adversarial_weight: float = 1.0,
                 head_hidden: int = 256, norm: str = "cont_batch") -> None:
        super().__init__()
        self.unet = GenesisUNet3D(in_channels=1, out_channels=1, norm=norm, output_activation="sigmoid")
        features = GenesisUNet3D.BOTTLENECK_CHANNELS
        self.scale_head = _pooled_mlp(features, head_hidden, num_scales)
        self.gradient_reversal = GradientReversal(adversarial_weight)
        self.domain_head = _pooled_mlp(features, head_hidden, num_domains)

    def forward(self, x: torch.Tensor, clean: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        skips, bottleneck = self.unet.encode(x)
        # the heads read the uncorrupted crop when it is given: out-painting and noise erase most
        # of the scale and modality cues they are meant to learn from
        head_features = bottleneck if clean is None else self.unet.encode(clean)[1]
        return {
            "restored": self.unet.decode(skips, bottleneck),
            "scale_logits": self.scale_head(head_features),
            "domain_logits": self.domain_head(self.gradient_reversal(head_features)),
            "bottleneck": bottleneck,
        }

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The U-Net's bottleneck ``(B, 512, H/8, W/8, D/8)``."""
        return self.unet.forward_features(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 512)``: the U-Net's embedding (what ``medfm embed`` writes for one window)."""
        return self.unet.embed(x)

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of the pre-training heads only (kept apart from the U-Net's bundle weights)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("unet.")}
