"""Seeding per process: each rank of a distributed run draws its own random numbers, reproducibly."""

from __future__ import annotations

import os

import torch
from monai.utils import set_determinism

__all__ = ["process_rank", "rank_seed", "seed_process"]


def process_rank() -> int:
    """This process's global rank: the initialised process group's, else torchrun's ``RANK``, else 0.

    ``RANK`` is read so that a workflow can seed itself before it joins the process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def rank_seed(seed: int) -> int:
    """``seed + rank``: one stream per rank, and rank 0 (or a single process) draws what ``seed`` alone draws."""
    return int(seed) + process_rank()


def seed_process(seed: int, deterministic: bool = True) -> int:
    """Seed Python, NumPy and torch with :func:`rank_seed` and return that seed.

    Every rank draws different random crops, corruptions and masks, so N processes see N times the
    augmentations of one; a run repeats for the same ``seed`` and world size. The network's initial
    weights may differ between ranks: DistributedDataParallel copies rank 0's to the others when it
    wraps the network. ``deterministic`` also asks cuDNN for its deterministic kernels (what MONAI's
    ``set_determinism`` does), which training needs to repeat bit for bit; inference passes ``False``:
    it keeps its seeds and lets cuDNN choose faster 3D convolution kernels (outputs may then differ
    between runs in the last bits).
    """
    seed = rank_seed(seed)
    set_determinism(seed=seed)
    if not deterministic:
        torch.backends.cudnn.deterministic = False
    return seed
