"""MONAI-style transforms (array + dictionary pairs), grouped by method."""

from .contract import CheckInputContract, CheckInputContractd, contract_deviations, read_contract
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
    "CheckInputContract",
    "CheckInputContractd",
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
    "contract_deviations",
    "read_contract",
]
