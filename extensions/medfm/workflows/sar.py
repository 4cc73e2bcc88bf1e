"""Loss and batch preparation for scale-aware restoration pre-training (Universal Model / SAR)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from monai.engines.utils import PrepareBatch
from torch import nn

from .batches import plain_tensor

__all__ = ["ScaleAwareRestorationLoss", "PrepareSARBatch"]


class ScaleAwareRestorationLoss(nn.Module):
    """Weighted sum of the three pretext losses: restoration (MSE), scale and modality (cross entropy).

    ``forward(pred, target)`` takes the network's ``{"restored", "scale_logits", "domain_logits"}``
    and ``{"image": clean crop, "scale": (B,) index, "domain": (B,) index}``. The discriminator
    minimises its cross entropy; the encoder sees it reversed through the network's
    gradient-reversal layer, so one optimiser serves both sides. After each call
    ``components`` holds the unweighted losses and the two heads' accuracies (floats) for logging.
    """

    def __init__(self, restoration_weight: float = 1.0, scale_weight: float = 0.1, domain_weight: float = 0.1) -> None:
        super().__init__()
        self.weights = {"restoration": float(restoration_weight), "scale": float(scale_weight),
                        "domain": float(domain_weight)}
        self.components: dict[str, float] = {}

    def forward(self, pred: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        losses = {
            "restoration": F.mse_loss(pred["restored"], target["image"]),
            "scale": F.cross_entropy(pred["scale_logits"], target["scale"].long()),
            "domain": F.cross_entropy(pred["domain_logits"], target["domain"].long()),
        }
        total = sum(self.weights[name] * value for name, value in losses.items())
        with torch.no_grad():
            self.components = {name: float(value) for name, value in losses.items()}
            self.components["scale_accuracy"] = float((pred["scale_logits"].argmax(1) == target["scale"]).float().mean())
            self.components["domain_accuracy"] = float((pred["domain_logits"].argmax(1) == target["domain"]).float().mean())
        return total


class PrepareSARBatch(PrepareBatch):
    """Network input from ``image_key`` (the corrupted crop); targets: clean crop, scale and domain indices.

    The clean crop is also passed to the network as ``clean``, for the scale and modality heads.
    """

    def __init__(self, image_key: str = "image", clean_key: str = "label", scale_key: str = "scale",
                 domain_key: str = "domain") -> None:
        self.image_key = image_key
        self.target_keys = {"image": clean_key, "scale": scale_key, "domain": domain_key}

    def __call__(self, batchdata: Mapping, device: str | torch.device | None = None, non_blocking: bool = False,
                 **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple, dict[str, torch.Tensor]]:
        targets = {name: plain_tensor(batchdata[key], device, non_blocking) for name, key in self.target_keys.items()}
        # (inputs, targets, args, kwargs): MONAI's trainer calls network(inputs, clean=...)
        return plain_tensor(batchdata[self.image_key], device, non_blocking), targets, (), {"clean": targets["image"]}
