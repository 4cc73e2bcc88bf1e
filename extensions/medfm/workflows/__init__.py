"""Pieces that MONAI's bundle workflows call but do not provide themselves."""

from .distributed import end_distributed_run
from .cohort import CohortRunner, CohortSummary, CohortWriter, inference_device
from .embedding import EmbeddingRunner, EmbeddingWriter
from .writers import PredictionWriter, SegmentationWriter
from .handlers import FINE_TUNING_RECORD, FineTuningRecord, datalist_fingerprint, CheckTrainingSchedule, LabelledMetricsSaver, LossComponentsLogger, PretrainedWeightsLoader, TrainingState, latest_training_state, require_checkpoint, stacked_outputs
from .inferers import FeatureTapInferer, MethodInferer, TiledEmbeddingInferer
from .precision import autocast_kwargs, mixed_precision
from .medical_transformer import BatchTripletLoss, MaskedEmbeddingLoss, PrepareMaskedSliceBatch, PrepareTripletBatch, subject_indices
from .sar import PrepareSARBatch, ScaleAwareRestorationLoss
from .spad import AnisoGroupedBatchSampler, MaskedTokenLoss, PrepareMIMBatch, PrepareSpadBatch, SpacingInferer, TokenizerLoss

__all__ = ["AnisoGroupedBatchSampler", "autocast_kwargs", "mixed_precision", "CheckTrainingSchedule", "FINE_TUNING_RECORD", "FineTuningRecord", "datalist_fingerprint", "PredictionWriter", "SegmentationWriter", "BatchTripletLoss", "LabelledMetricsSaver", "CohortRunner", "CohortSummary", "CohortWriter", "EmbeddingRunner", "EmbeddingWriter", "inference_device", "end_distributed_run", "FeatureTapInferer", "LossComponentsLogger", "MaskedEmbeddingLoss", "MaskedTokenLoss", "PrepareMIMBatch", "PrepareSpadBatch", "TokenizerLoss", "MethodInferer", "TiledEmbeddingInferer", "PrepareMaskedSliceBatch", "PrepareTripletBatch", "PrepareSARBatch", "PretrainedWeightsLoader", "ScaleAwareRestorationLoss", "SpacingInferer", "TrainingState", "latest_training_state", "require_checkpoint", "stacked_outputs", "subject_indices"]
