"""Pieces that MONAI's bundle workflows call but do not provide themselves."""

from .handlers import LossComponentsLogger, PretrainedWeightsLoader
from .inferers import FeatureTapInferer, MethodInferer
from .sar import PrepareSARBatch, ScaleAwareRestorationLoss

__all__ = ["FeatureTapInferer", "LossComponentsLogger", "MethodInferer", "PrepareSARBatch", "PretrainedWeightsLoader", "ScaleAwareRestorationLoss"]
