"""MONAI-style transforms (array + dictionary pairs), grouped by method."""

from .embedding import GlobalAveragePool, GlobalAveragePoold
from .genesis import (
    GenesisCorruptiond,
    RandInPaint,
    RandInPaintd,
    RandLocalPixelShuffle,
    RandLocalPixelShuffled,
    RandNonlinearIntensity,
    RandNonlinearIntensityd,
    RandOutPaint,
    RandOutPaintd,
)

__all__ = [
    "GenesisCorruptiond",
    "GlobalAveragePool",
    "GlobalAveragePoold",
    "RandInPaint",
    "RandInPaintd",
    "RandLocalPixelShuffle",
    "RandLocalPixelShuffled",
    "RandNonlinearIntensity",
    "RandNonlinearIntensityd",
    "RandOutPaint",
    "RandOutPaintd",
]
