"""MONAI-style transforms (array + dictionary pairs), grouped by method."""

from .brain_mri import (
    AveragePool,
    AveragePoold,
    RandSliceMask,
    RandSliceMaskd,
    RandT1Augmentation,
    RandT1Augmentationd,
    slice_counts,
)
from .contract import CheckInputContract, CheckInputContractd, contract_deviations, read_contract
from .embedding import GlobalAveragePool, GlobalAveragePoold
from .intensity import ModalityIntensity, ModalityIntensityd, RestoreIntensity, RestoreIntensityd, resolve_modality
from .region import CropAtWorldPoint, CropAtWorldPointd, PointOutsideScanError, lps_to_voxel, voxel_to_lps
from .sar import RandMultiScaleCrop, RandMultiScaleCropd
from .spad import SpadResample, SpadResampled, image_aniso_d, voxel_spacing
from .spatial import ResampleToSpacingd
from .vdt import VariableDimensionTransform, VariableDimensionTransformd
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
    "AveragePool",
    "AveragePoold",
    "RandSliceMask",
    "RandSliceMaskd",
    "RandT1Augmentation",
    "RandT1Augmentationd",
    "slice_counts",
    "CheckInputContract",
    "CheckInputContractd",
    "CropAtWorldPoint",
    "CropAtWorldPointd",
    "PointOutsideScanError",
    "GenesisCorruptiond",
    "GlobalAveragePool",
    "GlobalAveragePoold",
    "ModalityIntensity",
    "ModalityIntensityd",
    "RandMultiScaleCrop",
    "RandMultiScaleCropd",
    "RestoreIntensity",
    "RestoreIntensityd",
    "SpadResample",
    "SpadResampled",
    "VariableDimensionTransform",
    "VariableDimensionTransformd",
    "RandInPaint",
    "RandInPaintd",
    "RandLocalPixelShuffle",
    "RandLocalPixelShuffled",
    "RandNonlinearIntensity",
    "RandNonlinearIntensityd",
    "RandOutPaint",
    "RandOutPaintd",
    "ResampleToSpacingd",
    "contract_deviations",
    "image_aniso_d",
    "lps_to_voxel",
    "read_contract",
    "resolve_modality",
    "voxel_spacing",
    "voxel_to_lps",
]
