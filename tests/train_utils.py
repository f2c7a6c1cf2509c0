"""Run engine/train.py in real subprocesses (1 process, or N DeepSpeed/torchrun ranks on CPU with
gloo) and read what it wrote. Shared by every engineer's end-to-end tests:

    from tests.train_utils import QUICKSTART, TINY, run_train, read_metrics, losses_by_step
    proc = run_train(QUICKSTART, TINY + [f"train.output_dir={tmp_path}"], nproc=2)
    assert losses_by_step(tmp_path)[1] > 0
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from parallel.zero import free_port

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "engine" / "train.py")
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")

# A few-second run on the quickstart's digits: a 2-block dense DiT, tiny batch, a record every step,
# no checkpoints, sampling or evaluation unless a test asks for them (append overrides after TINY).
TINY = [
    "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "model.moe.routing=dense",
    "train.global_batch_size=8", "train.micro_batch_size=0", "train.max_steps=3", "train.log_every=1",
    "train.save_every=0", "train.sample_every=0", "train.progress=false", "train.resume=", "train.warmup_steps=0",
    "eval.num_samples=0", "eval.sample_steps=2", "data.num_workers=0",
]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """One thread per rank (the machine is shared), the repository importable, no inherited rank vars."""
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def train_command(config: str, overrides: list[str], nproc: int = 1, launcher: str = "deepspeed") -> list[str]:
    """`python engine/train.py ...` for one process, else the deepspeed (or torchrun) launcher."""
    args = [TRAIN, "--config", config, *overrides]
    if nproc == 1 and launcher != "torchrun":
        return [sys.executable, *args]
    port = str(free_port())
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_addr",
                "127.0.0.1", "--master_port", port, *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
                "127.0.0.1", "--master_port", port, *args]
    raise ValueError(f"unknown launcher {launcher!r}")


def run_train(config: str, overrides: list[str], nproc: int = 1, launcher: str = "deepspeed", check: bool = True,
              timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run training to completion; with `check`, a non-zero exit fails with the output's tail."""
    proc = subprocess.run(train_command(config, overrides, nproc, launcher), cwd=REPO, env=child_env(env),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}"
                             f"\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def start_train(config: str, overrides: list[str], nproc: int = 1, launcher: str = "deepspeed",
                env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start training in its own process group (for signal tests); stop it with `stop_train`."""
    return subprocess.Popen(train_command(config, overrides, nproc, launcher), cwd=REPO, env=child_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def stop_train(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 60) -> tuple[str, str]:
    """Send `sig` to the run's whole process group and collect its output."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=timeout)
    return out, err


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every record of run_dir/metrics.jsonl, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses_by_step(run_dir: str | Path) -> dict[int, float]:
    """{step: loss} of the training records (evaluation records carry no loss)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
