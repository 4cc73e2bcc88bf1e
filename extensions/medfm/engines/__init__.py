"""Training engines and process set-up for the bundles' workflows (MONAI's ``monai.engines`` counterpart)."""

from .trainer import SupervisedTrainer, parameters_without_gradient
from .utils import process_rank, rank_seed, seed_process

__all__ = ["SupervisedTrainer", "parameters_without_gradient", "process_rank", "rank_seed", "seed_process"]
