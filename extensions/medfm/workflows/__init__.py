"""Pieces that MONAI's bundle workflows call but do not provide themselves."""

from .handlers import LossComponentsLogger, PretrainedWeightsLoader
from .inferers import FeatureTapInferer, MethodInferer
from .medical_transformer import BatchTripletLoss, MaskedEmbeddingLoss, PrepareMaskedSliceBatch, PrepareTripletBatch
from .sar import PrepareSARBatch, ScaleAwareRestorationLoss

__all__ = ["BatchTripletLoss", "FeatureTapInferer", "LossComponentsLogger", "MaskedEmbeddingLoss", "MethodInferer", "PrepareMaskedSliceBatch", "PrepareTripletBatch", "PrepareSARBatch", "PretrainedWeightsLoader", "ScaleAwareRestorationLoss"]
