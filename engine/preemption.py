"""Preemption: SIGTERM or SIGUSR1 -> finish the current step, checkpoint, exit with REQUEUE_EXIT_CODE.

Slurm sends SIGTERM on preemption, `scancel` and at the time limit (SIGKILL follows after the
cluster's KillWait), and SIGUSR1 ahead of time when the job asks for it (`--signal=USR1@120`).
The handler only records the signal. The trainer asks `requested()` once per step; that is a
collective, so every rank stops after the same step even when the signal reached only some of
them. The trainer then writes a checkpoint and exits with REQUEUE_EXIT_CODE, which
launchers/common.sh turns into `scontrol requeue`; the requeued job starts with
`train.resume=auto` and continues from that checkpoint by itself.

    preemption = PreemptionHandler()                 # installs the handlers (main thread)
    for step in ...:
        train_step(...)
        if preemption.requested(all_reduce_sum):     # every rank, every step
            save_checkpoint(...)
            raise SystemExit(preemption.exit_code)
"""
from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from types import FrameType

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# EX_TEMPFAIL of sysexits.h ("temporary failure, try again later"). launchers/common.sh reads this line.
REQUEUE_EXIT_CODE: int = 75

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
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=_collective_device())
        stop = bool((all_reduce_sum(flag) if all_reduce_sum is not None else flag).item() > 0)
        if stop and not self._announced:
            self._announced = True
            if not dist.is_initialized() or dist.get_rank() == 0:
                what = self.received.name if self.received is not None else "a preemption signal on another rank"
                log.warning("%s: checkpointing after this step, then exiting with code %d for a requeue",
                            what, self.exit_code)
        return stop

    def restore(self) -> None:
        """Put back the handlers that were installed before."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _collective_device() -> torch.device:
    """NCCL reduces device tensors only; gloo and a single process use the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
