"""Agreement on failure, with real processes and a real write failure: one rank that cannot write
(a file-size limit on that process only, RLIMIT_FSIZE with SIGXFSZ ignored, so write() fails with
EFBIG as on a full disk) makes every rank raise the same CheckpointError naming that rank and its
file, at once (no collective timeout), and the previous checkpoint stays the loadable `latest`.
Also: leftover cleanup removes only temporary folders of this process or of dead owners.
"""
from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from engine.data.digits import build_digits_shards, default_digits_dir
from parallel.checkpoint.files import remove_leftovers
from tests.checkpoint_utils import build_engine, train_step
from tests.dist_utils import run_distributed
from tests.train_utils import QUICKSTART, REPO, TINY, TRAIN, child_env, free_port

LIMIT_BYTES = 4096  # far below a rank's checkpoint file, above anything else a rank writes


def _limit_file_size() -> None:
    """In this process only: writes beyond LIMIT_BYTES fail with EFBIG instead of killing it."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT_BYTES, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def _save_with_rank1_limited(root: str) -> dict:
    """Save step 1; then save step 2 with rank 1 unable to write; then load `latest`."""
    import torch.distributed as dist

    from parallel.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint

    cfg, engine, ema = build_engine(["parallel.ep_size=2"])
    train_step(engine, ema, 1)
    save_checkpoint(Path(root), 1, engine, ema, {"step": 1}, cfg)
    expected = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    train_step(engine, ema, 2)
    saved_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    if dist.get_rank() == 1:
        _limit_file_size()
    try:
        save_checkpoint(Path(root), 2, engine, ema, {"step": 2}, cfg)
        error = "no error"
    except CheckpointError as e:
        error = str(e)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, saved_limit)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    entries = sorted(p.name for p in Path(root).iterdir())
    latest = latest_checkpoint(Path(root))
    state = load_checkpoint(latest, engine, ema, cfg)
    restored = all(v.equal(expected[k]) for k, v in engine.module.state_dict().items())
    return {"error": error, "entries": entries, "latest": str(latest), "step": state["step"], "restored": restored}


@pytest.mark.slow
def test_one_rank_failing_to_write_fails_every_rank_and_keeps_the_previous(tmp_path):
    results = run_distributed(_save_with_rank1_limited, 2, str(tmp_path))
    bad_file = tmp_path / ".tmp-step_0000002"
    for rank, r in enumerate(results):
        message = r["error"]
        assert message.startswith(f"saving checkpoint {tmp_path / 'step_0000002'} failed on rank 1: "), (rank, message)
        assert f"{bad_file}." in message and "rank_00001.safetensors" in message, (rank, message)
        assert "File too large" in message, (rank, message)
        assert r["entries"] == ["latest", "step_0000001"], rank  # the failed save left nothing behind
        assert r["latest"] == str(tmp_path / "step_0000001") and r["step"] == 1 and r["restored"], rank


@pytest.mark.slow
def test_trainer_ranks_exit_with_one_error_line_naming_the_rank_and_file(tmp_path):
    """engine/train.py at world 2, rank 1 unable to write files: both ranks exit 1 at the first
    checkpoint, each with exactly one `error:` line naming rank 1 and its file."""
    build_digits_shards(default_digits_dir())  # built on first use otherwise, a write rank 1 could not make
    port = str(free_port())
    overrides = TINY + ["train.save_every=1", "train.max_steps=2", f"train.output_dir={tmp_path}"]
    ranks = [subprocess.Popen(
        [sys.executable, TRAIN, "--config", QUICKSTART, *overrides], cwd=REPO,
        env=child_env({"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}),
        preexec_fn=_limit_file_size if r == 1 else None,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in ranks]
    for rank, (proc, out) in enumerate(zip(ranks, outputs)):
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert proc.returncode == 1, f"rank {rank}: exit {proc.returncode}\n{out[-3000:]}"
        assert len(errors) == 1, f"rank {rank}:\n{out[-3000:]}"
        assert "step_0000001 failed on rank 1" in errors[0] and "rank_00001.safetensors" in errors[0], errors[0]
    assert not (tmp_path / "checkpoints" / "latest").exists()


def test_leftover_cleanup_removes_only_own_or_dead_owners_folders(tmp_path):
    host = socket.gethostname().replace(".", "_")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    folders = {
        "mine": f".tmp-step_0000002.{host}.{os.getpid()}",
        "dead": f".trash-step_0000001.{host}.{dead_pid}",
        "live": f".tmp-step_0000003.{host}.{os.getppid()}",  # a running process: a save in progress
        "other_host": f".tmp-step_0000004.elsewhere.{dead_pid}",  # cannot tell from here
        "unowned": ".tmp-step_0000005",
    }
    for name in folders.values():
        (tmp_path / name).mkdir()
    pointer = f".tmp-latest.{host}.{dead_pid}"  # a `latest` replacement that never got renamed
    (tmp_path / pointer).write_text("step_0000001\n")
    (tmp_path / "step_0000001").mkdir()
    removed = remove_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == sorted([folders["mine"], folders["dead"], pointer])
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([folders["live"], folders["other_host"], folders["unowned"], "step_0000001"])
    # with the run directory's lock held, no other job can be saving here: every leftover goes
    remove_leftovers(tmp_path, exclusive=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000001"]
