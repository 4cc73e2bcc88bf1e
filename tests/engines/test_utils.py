"""Seeding per rank: each process of a distributed run draws its own numbers, the same ones every run."""

import numpy as np
import torch

from medfm.engines import process_rank, rank_seed, seed_process


def _draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist()


def test_each_rank_draws_its_own_numbers_and_repeats_them(monkeypatch):
    draws = {}
    for rank in ("0", "1", "0"):
        monkeypatch.setenv("RANK", rank)
        assert process_rank() == int(rank) and rank_seed(7) == 7 + int(rank)
        assert seed_process(7) == 7 + int(rank)
        draws.setdefault(rank, []).append(_draws())
    assert draws["0"][0] == draws["0"][1], "the same seed and rank repeat"
    assert draws["0"][0][0] != draws["1"][0][0] and draws["0"][0][1] != draws["1"][0][1]
    monkeypatch.delenv("RANK")
    assert process_rank() == 0 and seed_process(7) == 7
    assert _draws() == draws["0"][0], "a single process draws what rank 0 draws"


def test_inference_keeps_its_seed_without_cudnn_determinism():
    seed_process(3)
    assert torch.backends.cudnn.deterministic
    first = _draws()
    seed_process(3, deterministic=False)
    assert not torch.backends.cudnn.deterministic
    assert _draws() == first
