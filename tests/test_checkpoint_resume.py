"""End to end through engine/train.py (tiny DiffMoE DiT, 2 ranks, ep_size 2, pool `world`):

- SIGTERM to one rank mid-training: every rank finishes the step, a checkpoint is written, and both
  exit with REQUEUE_EXIT_CODE (ranks are started directly, as srun starts them under Slurm);
- train.resume=auto from that checkpoint logs the uninterrupted run's losses bit for bit;
- the same checkpoint resumed at world 1 / ep_size 1 and at world 4 / ep_size 2 continues the
  uninterrupted run's loss curve (1e-5; the pool `world` is the global batch in every layout).
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.preemption import REQUEUE_EXIT_CODE
from tests.train_utils import QUICKSTART, REPO, TINY, TRAIN, child_env, free_port, losses_by_step

pytestmark = pytest.mark.slow

MOE = ["model.moe.routing=diffmoe", "model.moe.num_experts=4", "model.moe.every=1", "model.moe.pool=world",
       "train.lr=0.001", "train.warmup_steps=5"]
EP2 = ["parallel.ep_size=2", "parallel.zero_stage=2"]
MORE = 3  # steps trained after the preemption checkpoint


def _start_ranks(overrides: list[str], world: int) -> list[subprocess.Popen]:
    """One `python engine/train.py` per rank with the torch.distributed variables set, like srun."""
    port = str(free_port())
    return [subprocess.Popen(
        [sys.executable, TRAIN, "--config", QUICKSTART, *overrides], cwd=REPO,
        env=child_env({"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]


def _train(overrides: list[str], world: int) -> str:
    """Train to the end on `world` directly started ranks; returns rank 0's output."""
    ranks = _start_ranks(overrides, world)
    outputs = [p.communicate(timeout=600)[0] for p in ranks]
    codes = [p.returncode for p in ranks]
    assert codes == [0] * world, f"exit codes {codes}\n" + "\n".join(o[-3000:] for o in outputs)
    return outputs[0]


def _logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip().endswith("}")]


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    """(run dir, stop step, uninterrupted reference run dir)."""
    base = tmp_path_factory.mktemp("resume")
    run = base / "preempted"
    ranks = _start_ranks(TINY + MOE + EP2 + ["train.max_steps=200", f"train.output_dir={run}"], 2)
    try:
        deadline = time.monotonic() + 300
        while max(_logged_steps(run), default=0) < 2:
            if any(p.poll() is not None for p in ranks) or time.monotonic() > deadline:
                pytest.fail("training did not reach step 2:\n" + "\n".join(p.communicate()[0][-3000:] for p in ranks))
            time.sleep(0.05)
        ranks[1].send_signal(signal.SIGTERM)  # only rank 1: rank 0 learns it through the all-reduce
        outputs = [p.communicate(timeout=300)[0] for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.communicate()
    codes = [p.returncode for p in ranks]
    assert codes == [REQUEUE_EXIT_CODE] * 2, f"exit codes {codes}\n" + "\n".join(o[-3000:] for o in outputs)
    stop = max(_logged_steps(run))
    assert 2 <= stop < 200
    reference = base / "uninterrupted"
    _train(TINY + MOE + EP2 + [f"train.max_steps={stop + MORE}", f"train.output_dir={reference}"], 2)
    return run, stop, reference


def test_sigterm_writes_a_checkpoint_and_exits_for_requeue(preempted):
    run, stop, _ = preempted
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stop:07d}"
    manifest = json.loads((run / "checkpoints" / f"step_{stop:07d}" / "manifest.json").read_text())
    assert manifest["step"] == stop and manifest["world_size"] == 2 and manifest["ep_size"] == 2


def test_resume_auto_equals_uninterrupted(preempted):
    run, stop, reference = preempted
    out = _train(TINY + MOE + EP2 + [f"train.max_steps={stop + MORE}", f"train.output_dir={run}",
                                     "train.resume=auto"], 2)
    assert f"resumed from {run / 'checkpoints' / f'step_{stop:07d}'} at step {stop}" in out
    resumed, expected = losses_by_step(run), losses_by_step(reference)
    for step in range(1, stop + MORE + 1):  # before the stop: the first run; after: the resumed one
        assert resumed[step] == expected[step], step


@pytest.mark.parametrize("world,layout", [(1, ["parallel.ep_size=1", "parallel.zero_stage=1"]),
                                          (4, ["parallel.ep_size=2", "parallel.zero_stage=1"])])
def test_resharded_resume_continues_the_loss_curve(preempted, tmp_path, world, layout):
    run, stop, reference = preempted
    checkpoint = run / "checkpoints" / f"step_{stop:07d}"
    _train(TINY + MOE + layout + [f"train.max_steps={stop + MORE}", f"train.output_dir={tmp_path}",
                                  f"train.resume={checkpoint}"], world)
    resumed, expected = losses_by_step(tmp_path), losses_by_step(reference)
    assert sorted(resumed) == list(range(stop + 1, stop + MORE + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(expected[step], rel=1e-5), step
