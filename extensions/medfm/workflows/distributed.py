"""The end of a torchrun worker's bundle workflow."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import Iterable

import torch.distributed as dist


def end_distributed_run(handlers: Iterable[object] = (), end_process: bool = True) -> None:
    """Closes the given handlers that hold files (TensorBoard writers), waits for every rank, destroys the process
    group and, in a torchrun worker, ends the process once the interpreter's exit handlers have run.

    DistributedDataParallel keeps its gloo process group alive after ``destroy_process_group`` (torch 2.13: its
    ``pt_gloo_runloop`` and ``gloo_tcp_loop`` threads outlive even ``del`` of the wrapper), so those threads are still
    running while the interpreter and the C++ runtime tear down. When a peer closes its sockets at that moment the
    worker aborts ("terminate called without an active exception") and torchrun fails a run that has finished and
    saved everything. Ending the process at once after the exit handlers leaves no teardown for them to race.
    Outside torchrun (a notebook, an in-process test) the interpreter is left running. ``end_process=False`` leaves
    ending it to the caller (:func:`end_torchrun_worker`), which has more to do first (``medfm finetune`` packages
    the trained model).
    """
    for handler in handlers:
        close = getattr(handler, "close", None)
        if callable(close):
            close()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if end_process:
        end_torchrun_worker()


def end_torchrun_worker() -> None:
    """In a torchrun worker, end the process now, once the interpreter's exit handlers have run (see
    :func:`end_distributed_run`); elsewhere nothing."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
