"""Small layers shared by the networks."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GradientReversal", "adapt_input_channels"]


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.weight * grad, None


class GradientReversal(nn.Module):
    """Identity forward; multiplies the gradient by ``-weight`` backward (Ganin and Lempitsky 2015).

    Placed between an encoder and a domain discriminator, one optimiser step trains the
    discriminator to tell the domains apart and the encoder to make them indistinguishable;
    ``weight`` sets how hard the encoder pushes back (0 disables the adversarial signal).
    """

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReverseGradient.apply(x, self.weight)

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


def adapt_input_channels(state_dict: dict[str, torch.Tensor], in_channels: int, key: str) -> dict[str, torch.Tensor]:
    """Adapt the first convolution ``state_dict[key]`` (``(out, in, ...)``) to ``in_channels`` inputs.

    The pretrained kernel is summed over its input channels, divided by the new count and
    repeated, so an input that repeats one image in every channel gets the pretrained response
    (a gray image into an RGB-trained kernel: the plain sum over RGB).
    """
    weight = state_dict[key]
    if weight.shape[1] == in_channels:
        return state_dict
    kernel = weight.float().sum(dim=1, keepdim=True) / in_channels
    adapted = dict(state_dict)
    adapted[key] = kernel.repeat(1, in_channels, *([1] * (weight.ndim - 2))).to(weight.dtype)
    return adapted
