"""MONAI's SupervisedTrainer with gradient accumulation that all-reduces once per step, and a check that every
trainable parameter is trained."""

from __future__ import annotations

import contextlib

import monai.engines
import torch
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from ..errors import MedfmError

__all__ = ["SupervisedTrainer", "parameters_without_gradient"]


def parameters_without_gradient(network: nn.Module) -> list[str]:
    """Names of the parameters that require a gradient but have none (``module.`` of a DDP wrapper dropped)."""
    module = network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
    return [name for name, parameter in module.named_parameters() if parameter.requires_grad and parameter.grad is None]


class SupervisedTrainer(monai.engines.SupervisedTrainer):
    """``monai.engines.SupervisedTrainer`` with two changes that distributed training needs.

    Gradient accumulation (``accumulation_steps`` N): the gradients of N consecutive batches, each loss
    divided by N, are summed before one optimizer step; the last group of an epoch steps even when it is
    shorter. Under ``DistributedDataParallel`` the first N - 1 forward and backward passes of a group run
    in ``no_sync()``, so gradients are all-reduced once per optimizer step instead of once per batch
    (MONAI 1.6's ``accumulation_steps`` all-reduces every batch; MONAI 1.5's trainer has none).

    The first backward pass of a run checks that every parameter with ``requires_grad`` received a
    gradient and stops with one line naming those that did not. Under DDP such a parameter makes the
    second iteration fail ("Expected to have finished reduction in the prior iteration"); in a single
    process it is silently never trained. A parameter that a workflow does not use belongs frozen in its
    config (``monai.networks.utils.freeze_layers``), not hidden behind ``find_unused_parameters``.

    Args:
        accumulation_steps: batches per optimizer step (1: no accumulation).
        args, kwargs: those of ``monai.engines.SupervisedTrainer`` (``compile`` is not supported).
    """

    def __init__(self, *args, accumulation_steps: int = 1, **kwargs) -> None:
        if not isinstance(accumulation_steps, int) or isinstance(accumulation_steps, bool) or accumulation_steps < 1:
            raise MedfmError(f"accumulation_steps (--accumulate) must be a whole number >= 1, got {accumulation_steps!r}")
        if kwargs.get("compile"):
            raise MedfmError("medfm's SupervisedTrainer does not support compile=True")
        super().__init__(*args, **kwargs)
        self.accumulation_steps = accumulation_steps
        self.gradients_checked = False

    def _group_position(self) -> tuple[bool, bool]:
        """Whether this iteration starts an accumulation group (zero the gradients) and ends one (step)."""
        epoch_length = self.state.epoch_length
        index = self.state.iteration - 1
        if epoch_length is not None:
            index %= epoch_length
        starts = index % self.accumulation_steps == 0
        ends = (index + 1) % self.accumulation_steps == 0 or (epoch_length is not None and index + 1 == epoch_length)
        return starts, ends

    def _iteration(self, engine: SupervisedTrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets, args, kwargs = batch if len(batch) == 4 else (*batch, (), {})
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        starts, ends = engine._group_position()
        engine.network.train()
        if starts:
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        skip_all_reduce = not ends and isinstance(engine.network, nn.parallel.DistributedDataParallel)
        with engine.network.no_sync() if skip_all_reduce else contextlib.nullcontext():
            with torch.autocast("cuda", **engine.amp_kwargs) if engine.amp else contextlib.nullcontext():
                engine.state.output[Keys.PRED] = engine.inferer(inputs, engine.network, *args, **kwargs)
                engine.fire_event(IterationEvents.FORWARD_COMPLETED)
                engine.state.output[Keys.LOSS] = engine.loss_function(engine.state.output[Keys.PRED], targets).mean()
                engine.fire_event(IterationEvents.LOSS_COMPLETED)
            loss = engine.state.output[Keys.LOSS] / engine.accumulation_steps
            (engine.scaler.scale(loss) if engine.scaler is not None else loss).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if not engine.gradients_checked:
            missing = parameters_without_gradient(engine.network)
            if missing:
                raise MedfmError(f"{len(missing)} trainable parameter(s) received no gradient in the first step: "
                                 f"{', '.join(missing)}; freeze them in the config (freeze_layers) or use them")
            engine.gradients_checked = True
        if ends:
            if engine.scaler is not None:
                engine.scaler.step(engine.optimizer)
                engine.scaler.update()
            else:
                engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
