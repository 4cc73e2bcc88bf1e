"""Pieces that MONAI's bundle workflows call but do not provide themselves."""

from .inferers import MethodInferer

__all__ = ["MethodInferer"]
