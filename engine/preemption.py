"""Preemption: SIGTERM or SIGUSR1 -> finish the current step, checkpoint, exit with REQUEUE_EXIT_CODE.

Slurm sends SIGTERM on preemption, `scancel` and at the time limit (SIGKILL follows after the
cluster's KillWait), and SIGUSR1 ahead of time when the job asks for it (`--signal=B:USR1@180`).
The handler only records the signal; engine/train.py installs it before anything heavy is imported,
so a signal that arrives while the model, engine or checkpoint load is still a clean stop. The
trainer asks `requested()` before its first step and once per step; that is a collective, so every
rank stops after the same step even when the signal reached only some of them.

The requeue decision belongs to the launcher, and it rests on a marker file, not on exit codes: once
the run's state is safely on disk (the preemption checkpoint is published, or nothing was trained
since the last one), rank 0 writes the file named by $REQUEUE_MARKER (launchers/common.sh sets it
per job). The launcher requeues only when the marker is there, so a crash (no marker) is never
requeued and a SIGTERM that arrives after a complete checkpoint is.

    preemption = PreemptionHandler()                 # first thing in the process (main thread)
    ...
    for step in ...:
        train_step(...)
        if preemption.requested(all_reduce_sum):     # every rank, every step
            save_checkpoint(...)
            write_requeue_marker(f"checkpoint {path}")   # rank 0
            raise SystemExit(preemption.exit_code)

This module imports only the standard library at import time: it must be cheap to load before torch.
"""
from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# EX_TEMPFAIL of sysexits.h ("temporary failure, try again later"): what a preempted trainer exits with.
REQUEUE_EXIT_CODE: int = 75

# The environment variable naming the marker file (set by launchers/common.sh; unset: no marker).
REQUEUE_MARKER_ENV = "REQUEUE_MARKER"

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    """Records SIGTERM / SIGUSR1 instead of dying; `requested` tells every rank when to stop."""

    exit_code = REQUEUE_EXIT_CODE

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS):
        self.received: signal.Signals | None = None
        self._announced = False
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in signals}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the step in flight (maybe inside a collective) must finish normally.
        if self.received is None:
            self.received = signal.Signals(signum)

    def requested(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> bool:
        """True on every rank once any rank has received a preemption signal. Collective when
        `all_reduce_sum` is given: all ranks must call it at the same step."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0.0 if self.received is None else 1.0], device=_collective_device())
        stop = bool((all_reduce_sum(flag) if all_reduce_sum is not None else flag).item() > 0)
        if stop and not self._announced:
            self._announced = True
            if not dist.is_initialized() or dist.get_rank() == 0:
                what = self.received.name if self.received is not None else "a preemption signal on another rank"
                log.warning("%s: stopping after this step with the state saved, then exiting with code %d "
                            "for a requeue", what, self.exit_code)
        return stop

    def restore(self) -> None:
        """Put back the handlers that were installed before."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def requeue_marker() -> Path | None:
    """The marker file the launcher asked for, or None when not run by launchers/common.sh."""
    path = os.environ.get(REQUEUE_MARKER_ENV, "")
    return Path(path) if path else None


def write_requeue_marker(what: str) -> Path | None:
    """Rank 0, once the state a requeued job resumes from is durable: tell the launcher to requeue.
    `what` (one line, e.g. the checkpoint) goes into the file for the job log. Written whole or not
    at all (temporary file + rename), so the launcher never acts on a half-written marker."""
    path = requeue_marker()
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(what + "\n")
    os.replace(tmp, path)
    return path


def _collective_device() -> torch.device:
    """NCCL reduces device tensors only; gloo and a single process use the CPU."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
