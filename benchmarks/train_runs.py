"""Training runs of the digits benchmarks (ablation, compute knob): one single-process
`engine/train.py` subprocess per run, one thread each, kept across invocations while the resolved
config is unchanged.

    seconds = train_run(run_dir, CONFIG, overrides)  # trains unless a finished run of the same config is there
    out = run_checked([python, script, ...], log)  # any other step of a benchmark, same environment
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from engine.config import ConfigError, load_config, to_dict

REPO = Path(__file__).resolve().parents[1]
TRAINED = "trained.json"  # written in the run directory once training finished: resolved config, seconds


def child_env() -> dict[str, str]:
    """One thread per run: runs go side by side on a shared machine."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def run_checked(cmd: list[str], log: Path) -> str:
    """Run `cmd` (stderr to `log`, stdout to log.out) and return its stdout; a failure names the log."""
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=child_env(), cwd=REPO)
    log.with_suffix(".out").write_text(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}); see {log}")
    return proc.stdout


def resolved_config(config: Path, overrides: list[str]) -> dict:
    """The full config the run gets: a changed default (not only a changed override) is a new run."""
    return to_dict(load_config(str(config), overrides))


def same_config(stored: dict, config: Path, overrides: list[str]) -> bool:
    """Whether a run that resolved to `stored` is the run `config` + `overrides` gives now. The
    stored config is read as inference reads a run's config (keys added since take their defaults),
    so a new option that keeps the old behaviour keeps the run, and a changed value does not."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(stored, sort_keys=False))
        try:
            then = to_dict(load_config(str(path)))
        except ConfigError:  # a key or value the current config no longer has
            return False
    return then == resolved_config(config, overrides)


def train_run(run: Path, config: Path, overrides: list[str]) -> float:
    """Train `config` with `overrides` (which set train.output_dir to `run`) unless `run` holds a
    finished run of the same resolved config; returns the training's wall-clock seconds (also of
    a kept run). A partial or stale run directory starts over."""
    resolved, marker = resolved_config(config, overrides), run / TRAINED
    if marker.is_file() and same_config(json.loads(marker.read_text())["config"], config, overrides):
        return float(json.loads(marker.read_text())["seconds"])
    if Path(resolved["train"]["output_dir"]).resolve() != run.resolve():
        raise ValueError(f"train_run: the overrides must set train.output_dir={run}")
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    begin = time.time()
    run_checked([sys.executable, str(REPO / "engine" / "train.py"), "--config", str(config), *overrides],
                run / "train.log")
    seconds = time.time() - begin
    marker.write_text(json.dumps({"config": resolved, "seconds": seconds}, indent=2) + "\n")
    return seconds
