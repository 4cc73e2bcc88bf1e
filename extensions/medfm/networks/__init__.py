"""Networks of the published foundation models, one architecture per file."""

from .genesis_unet3d import GenesisUNet3D

__all__ = ["GenesisUNet3D"]
