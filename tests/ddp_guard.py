"""Test-only handler for the distributed-training guard: what each rank drew and what it ended with.

Attached to a bundle's trainer by an overlay (``+train#handlers``), it writes ``guard_rank{R}.json`` into
the run's output folder: a digest of every iteration's network inputs and targets (after augmentation,
corruption and masking, so the random draws show in them), the number of iterations, and a digest of the
parameters once training has finished.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping

import torch
from ignite.engine import Engine, Events
from monai.utils.enums import CommonKeys as Keys
from torch import nn


def _update(digest, value) -> None:
    if isinstance(value, torch.Tensor):
        digest.update(value.detach().cpu().contiguous().as_subclass(torch.Tensor).numpy().tobytes())
    elif isinstance(value, Mapping):
        for key in sorted(value):
            digest.update(str(key).encode())
            _update(digest, value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            _update(digest, item)
    else:
        digest.update(repr(value).encode())


def digest_of(value) -> str:
    """sha256 of the tensors (and other values) in ``value``, nested in mappings and sequences."""
    digest = hashlib.sha256()
    _update(digest, value)
    return digest.hexdigest()


def parameter_digest(network: nn.Module) -> str:
    module = network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
    return digest_of(dict(module.named_parameters()))


class GuardRecorder:
    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self.draws: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record_draw)
        engine.add_event_handler(Events.COMPLETED, self.record_end)

    def record_draw(self, engine: Engine) -> None:
        # MONAI's trainers decollate their output into one dict per item before this event
        items = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        self.draws.append(digest_of([(item[Keys.IMAGE], item[Keys.LABEL]) for item in items]))

    def record_end(self, engine: Engine) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        record = {"iterations": engine.state.iteration, "draws": self.draws,
                  "parameters": parameter_digest(engine.network)}
        with open(os.path.join(self.output_dir, f"guard_rank{rank}.json"), "w") as stream:
            json.dump(record, stream)
