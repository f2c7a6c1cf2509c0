"""SIGTERM / SIGUSR1 set a flag instead of killing the process, and every rank agrees to stop at the
same step even when only one rank got the signal. Through engine/train.py: a signal during start-up
is a clean stop for requeue, and the launcher's requeue marker appears only once the preemption
checkpoint is complete. (Resume after preemption: tests/test_checkpoint_resume.py.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from engine.preemption import REQUEUE_EXIT_CODE, REQUEUE_MARKER_ENV, PreemptionHandler
from engine.run_dir import LOCK_FILE
from tests.dist_utils import run_distributed
from tests.train_utils import QUICKSTART, REPO, TINY, TRAIN, child_env, losses_by_step, start_train, stop_train


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


# `python engine/train.py ...` that sends itself SIGUSR1 while the trainer first imports DeepSpeed (in
# init_distributed, before the run-dir lock, model, engine and checkpoint): a deterministic "early" signal.
EARLY_USR1 = """
import os, runpy, signal, sys

class SignalOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == "deepspeed":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGUSR1)
        return None

sys.meta_path.insert(0, SignalOnImport())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_usr1_during_start_up_stops_cleanly_for_requeue(tmp_path):
    """Before the handler was installed first thing, this SIGUSR1 killed the process (exit -10)."""
    run, marker = tmp_path / "run", tmp_path / "logs" / ".requeue-1"
    result = subprocess.run([sys.executable, "-c", EARLY_USR1, TRAIN, "--config", QUICKSTART, *TINY,
                             f"train.output_dir={run}"], cwd=REPO, env=child_env({REQUEUE_MARKER_ENV: str(marker)}),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == REQUEUE_EXIT_CODE, result.stderr[-3000:]
    assert marker.read_text() == "nothing trained yet; resumes from the start\n"
    assert not list((run / "checkpoints").glob("step_*"))  # nothing to save: no checkpoint
    assert not (run / "metrics.jsonl").exists()  # stopped before the first step
    assert not (run / LOCK_FILE).exists()  # released on the way out


@pytest.mark.slow
def test_marker_follows_the_complete_preemption_checkpoint(tmp_path):
    run, marker = tmp_path / "run", tmp_path / ".requeue-2"
    proc = start_train(QUICKSTART, [*TINY, "train.max_steps=100000", f"train.output_dir={run}"],
                       env={REQUEUE_MARKER_ENV: str(marker)})
    try:
        while not (losses_by_step(run) if (run / "metrics.jsonl").is_file() else {}):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        assert not marker.exists()  # training: no marker
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            stop_train(proc)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert marker.read_text() == f"checkpoint {run / 'checkpoints' / latest}\n"
    assert (run / "checkpoints" / latest / "manifest.json").is_file()
    assert not (run / LOCK_FILE).exists()
