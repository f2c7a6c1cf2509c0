"""A process SIGKILLed in the middle of a save leaves the previous checkpoint loadable and `latest`
pointing at it; the next save clears the debris. Resume resolution (`train.resume`)."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import load_config
from parallel.checkpoint import CheckpointError, read_manifest, resolve_resume, verify_checkpoint
from tests.checkpoint_utils import TINY_MOE, build_engine, train_step
from tests.dist_utils import run_distributed
from tests.train_utils import REPO, child_env

POINTS = ["write", "publish", "pointer"]


def _resume_cfg(run: Path, resume: str = "auto"):
    return load_config(None, TINY_MOE + [f"train.output_dir={run}", f"train.resume={resume}"])


def _recover(runs: list[str]) -> list[dict]:
    """In a fresh engine: resume each run from `latest`, compare with the state saved as step 1, save step 2."""
    from parallel.checkpoint import load_checkpoint, resolve_resume, save_checkpoint

    out = []
    for run in runs:
        cfg, engine, ema = build_engine([f"train.output_dir={run}", "train.resume=auto"], seed=1)
        path = resolve_resume(cfg)
        state = load_checkpoint(path, engine, ema, cfg)
        expected = torch.load(Path(run) / "expected_step1.pt")
        equal = all(torch.equal(expected[k], v) for k, v in engine.module.state_dict().items())
        train_step(engine, ema, 2)
        save_checkpoint(Path(run) / "checkpoints", 2, engine, ema, {"step": 2}, cfg)
        out.append({"path": str(path), "step": state["step"], "equal": equal,
                    "entries": sorted(p.name for p in (Path(run) / "checkpoints").iterdir())})
    return out


@pytest.mark.slow
def test_save_killed_midway_keeps_previous_checkpoint(tmp_path):
    runs = {point: tmp_path / point for point in POINTS}
    program = "from tests.checkpoint_utils import save_then_die; save_then_die({!r}, {!r})"
    procs = {point: subprocess.Popen([sys.executable, "-c", program.format(str(run), point)], cwd=REPO, env=child_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for point, run in runs.items()}
    for point, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == -9, f"{point}: exit {proc.returncode}\n{out[-3000:]}"

    for point, run in runs.items():
        root = run / "checkpoints"
        assert (root / "latest").read_text().strip() == "step_0000001", point
        step1 = resolve_resume(_resume_cfg(run))
        assert step1 == root / "step_0000001", point
        assert verify_checkpoint(step1)["step"] == 1  # every file present and matching its checksum
        entries = sorted(p.name for p in root.iterdir())
        if point == "pointer":  # step 2 is complete but not yet the latest
            assert entries == ["latest", "step_0000001", "step_0000002"], point
        else:  # the half-written temporary folder, named after the dead process, is the only trace of step 2
            assert entries[1:] == ["latest", "step_0000001"], point
            assert entries[0].startswith(f".tmp-step_0000002.{socket.gethostname().replace('.', '_')}."), point

    recovered = run_distributed(_recover, 1, [str(runs[p]) for p in POINTS])[0]
    for point, r in zip(POINTS, recovered):
        assert r["path"].endswith("step_0000001") and r["step"] == 1 and r["equal"], point
        assert r["entries"] == ["latest", "step_0000001", "step_0000002"], point
        assert (runs[point] / "checkpoints" / "latest").read_text().strip() == "step_0000002"


def test_resolve_resume(tmp_path):
    assert resolve_resume(_resume_cfg(tmp_path, "")) is None
    assert resolve_resume(_resume_cfg(tmp_path)) is None  # auto, nothing saved yet
    root = tmp_path / "checkpoints"
    for step in (5, 10):
        (root / f"step_{step:07d}").mkdir(parents=True)
        (root / f"step_{step:07d}" / "manifest.json").write_text("{}")
    (root / "latest").write_text("step_0000005\n")
    assert resolve_resume(_resume_cfg(tmp_path)) == root / "step_0000005"  # latest wins over the newest
    assert resolve_resume(_resume_cfg(tmp_path, str(root / "step_0000010"))) == root / "step_0000010"
    (root / "latest").write_text("step_0000007\n")  # points at a folder that is gone: newest complete one
    assert resolve_resume(_resume_cfg(tmp_path)) == root / "step_0000010"

    (root / "latest").unlink()  # a crash before the first pointer write: the newest complete one
    assert resolve_resume(_resume_cfg(tmp_path)) == root / "step_0000010"

    (root / "step_0000015").mkdir()  # no manifest: not a checkpoint
    with pytest.raises(CheckpointError, match="step_0000015 is not a complete checkpoint"):
        resolve_resume(_resume_cfg(tmp_path, str(root / "step_0000015")))
    with pytest.raises(CheckpointError, match="step_0000099 does not exist"):
        resolve_resume(_resume_cfg(tmp_path, str(root / "step_0000099")))
    with pytest.raises(CheckpointError, match="not a diffmoe-checkpoint v2 manifest"):
        read_manifest(root / "step_0000005")
    (root / "step_0000005" / "manifest.json").write_text("{")
    with pytest.raises(CheckpointError, match="step_0000005/manifest.json is unreadable"):
        read_manifest(root / "step_0000005")


@pytest.mark.slow
def test_async_checkpoints_of_the_trainer_are_all_published(tmp_path):
    """train.async_checkpoint: each save is published by a later step's poll or, for the last one,
    before the trainer exits; every kept folder is complete and matches its checksums."""
    from tests.train_utils import QUICKSTART, TINY, run_train

    run_train(QUICKSTART, TINY + ["train.max_steps=5", "train.save_every=2", "train.async_checkpoint=true",
                                  f"train.output_dir={tmp_path}"])
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002", "step_0000004", "step_0000005"]
    assert (root / "latest").read_text().strip() == "step_0000005"
    for step in (2, 4, 5):
        assert verify_checkpoint(root / f"step_{step:07d}")["step"] == step
