"""SIGTERM / SIGUSR1 set a flag instead of killing the process, and every rank agrees to stop at the
same step even when only one rank got the signal. (End to end through engine/train.py:
tests/test_checkpoint_resume.py.)"""
from __future__ import annotations

import os
import signal

import pytest

from engine.preemption import REQUEUE_EXIT_CODE, PreemptionHandler
from tests.dist_utils import run_distributed


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_is_recorded_not_fatal(sig):
    before = signal.getsignal(sig)
    handler = PreemptionHandler()
    try:
        assert not handler.requested()
        os.kill(os.getpid(), sig)
        assert handler.requested() and handler.received == sig
        assert handler.exit_code == REQUEUE_EXIT_CODE == 75
    finally:
        handler.restore()
    assert signal.getsignal(sig) is before


def _agree_on_stop() -> list[bool]:
    import torch.distributed as dist

    from parallel.expert_parallel import all_reduce_sum

    handler = PreemptionHandler()
    try:
        seen = [handler.requested(all_reduce_sum)]
        dist.barrier()
        if dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        dist.barrier()
        seen.append(handler.requested(all_reduce_sum))
        return seen
    finally:
        handler.restore()


@pytest.mark.slow
def test_ranks_agree_when_one_rank_is_signalled():
    assert run_distributed(_agree_on_stop, 2) == [[False, True], [False, True]]
