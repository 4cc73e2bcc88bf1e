"""Pieces that MONAI's bundle workflows call but do not provide themselves."""

from .handlers import PretrainedWeightsLoader
from .inferers import MethodInferer

__all__ = ["MethodInferer", "PretrainedWeightsLoader"]
