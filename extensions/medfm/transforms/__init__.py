"""MONAI-style transforms (array + dictionary pairs), grouped by method."""

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
    "RandInPaint",
    "RandInPaintd",
    "RandLocalPixelShuffle",
    "RandLocalPixelShuffled",
    "RandNonlinearIntensity",
    "RandNonlinearIntensityd",
    "RandOutPaint",
    "RandOutPaintd",
]
