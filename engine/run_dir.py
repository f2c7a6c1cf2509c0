"""The run directory: `train.output_dir` (default runs/<config name>).

    tb/            TensorBoard events            metrics.jsonl   one JSON object per logged step
    checkpoints/   step_XXXXXXX/ + latest        samples/        PNG grids of the EMA model
    config.yaml    the resolved config that ran
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from engine.config import ConfigError, save_config

if TYPE_CHECKING:
    from engine.config import Config


def checkpoint_root(cfg: Config) -> Path:
    return cfg.run_dir / "checkpoints"


def samples_dir(cfg: Config) -> Path:
    return cfg.run_dir / "samples"


def prepare_run_dir(cfg: Config, is_main: bool) -> Path:
    """Create the layout and write config.yaml (rank 0). A fresh run (`train.resume: ""`) refuses a
    folder that already holds checkpoints, so an earlier run is never overwritten by accident."""
    run = cfg.run_dir
    ckpts = checkpoint_root(cfg)
    if not cfg.train.resume and ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir()):
        raise ConfigError(f"train.resume: {run} already holds checkpoints; continue it with train.resume=auto "
                          "or start elsewhere with train.output_dir=DIR")
    if is_main:
        for sub in (run, ckpts, samples_dir(cfg), run / "tb"):
            sub.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.yaml")
    return run
