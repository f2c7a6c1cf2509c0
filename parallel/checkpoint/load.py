"""Loading (resharding to this run's world size and `parallel.ep_size`) and choosing what to load.

    state = load_checkpoint(path, engine, ema, cfg)     # collective; returns the saved train_state
    path  = resolve_resume(cfg)                          # train.resume

Two agreements (parallel.checkpoint.agree): 1. every rank read the manifest, found it compatible and
checked its share of the files' checksums (each file once in the job); 2. every rank restored its
state. Each rank reads the whole tensors it holds (dense weights and EMA, its own experts'), and of
the optimizer state only the range of its new ZeRO partition.
"""
from __future__ import annotations

import io
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from parallel.checkpoint.agree import agree, attempt
from parallel.checkpoint.files import MANIFEST, CheckpointError, read_pointer
from parallel.checkpoint.layout import (RNG_KEY, EMALike, Layout, complete_steps, is_expert, layout_of,
                                        model_tensors, rank_file, read_manifest, step_dir_name)
from parallel.checkpoint.reader import CheckpointReader
from parallel.checkpoint.zero_state import ZeroOptimizerState

if TYPE_CHECKING:
    from engine.config import Config

log = logging.getLogger(__name__)


def load_checkpoint(path: Path, engine: Any, ema: EMALike | None, cfg: Config) -> dict:
    """Restore weights, optimizer state, EMA, lr schedule and RNG from checkpoint folder `path`, resharding
    to this run's layout; returns the saved `train_state`. Collective: every rank calls it."""
    path = Path(path)
    what = f"loading checkpoint {path}"

    def check() -> tuple[Any, ...]:
        tensors = model_tensors(engine.module)
        zero = ZeroOptimizerState(engine)
        layout = layout_of(cfg, tensors)
        manifest = read_manifest(path)
        _check_compatible(path, manifest, tensors, zero, ema, layout)
        with CheckpointReader(path, manifest) as reader:
            reader.verify(reader.file_names()[layout.rank::layout.world_size])  # each file once, in parallel
        return tensors, zero, layout, manifest

    checked, error = attempt(check)
    agree(what, error)
    tensors, zero, layout, manifest = checked
    _, error = attempt(_restore, path, manifest, tensors, zero, layout, engine, ema)
    agree(what, error)
    if layout.rank == 0:
        log.info("loaded checkpoint %s (step %d, saved at world %d / ep_size %d)", path, manifest["step"],
                 manifest["world_size"], manifest["ep_size"])
    return manifest["train_state"]


@torch.no_grad()
def _restore(path: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], zero: ZeroOptimizerState,
             layout: Layout, engine: Any, ema: EMALike | None) -> None:
    opt = manifest["optimizer"]
    scalars = {k: tuple(v) for k, v in opt["scalars"].items()}
    if opt["state_keys"] or scalars:
        zero.prepare_state(opt["state_keys"], scalars)
    with CheckpointReader(path, manifest) as reader:
        for name, t in tensors.items():
            lo, hi = layout.block(t)
            value = reader.read(f"model/{name}", lo, hi)
            t.copy_(value.view(t.shape))
            fragment = zero.fragment(t) if manifest["tensors"][name]["optimizer"] else None
            if fragment is not None:  # this rank's ZeRO partition: master weight and moments
                start, length = fragment
                zero.view(t, None).copy_(value.narrow(0, start, length))
                for key in opt["state_keys"]:
                    zero.view(t, key).copy_(reader.read(f"{key}/{name}", lo + start, lo + start + length))
        if ema is not None:
            ema.load_state_dict({name: reader.read(f"ema/{name}", *layout.block(tensors[name])).view(
                tensors[name].shape) for name in ema.state_dict()})
        _restore_schedule(engine, manifest, path)
        if manifest["world_size"] == layout.world_size:
            _set_rng(reader.raw(rank_file(layout.rank), RNG_KEY).numpy().tobytes())
        elif layout.rank == 0:
            log.info("checkpoint %s was saved at world size %d: RNG states not restored (training draws are "
                     "addressed by sample index and do not depend on them)", path, manifest["world_size"])


def _check_compatible(path: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor],
                      zero: ZeroOptimizerState, ema: EMALike | None, layout: Layout) -> None:
    saved = manifest["tensors"]
    missing, unexpected = sorted(set(tensors) - set(saved)), sorted(set(saved) - set(tensors))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]} (is it the same model config?)")
    has_experts = any(rec["expert"] for rec in saved.values())
    if has_experts and manifest["num_experts"] != layout.num_experts:
        raise CheckpointError(f"checkpoint {path} has {manifest['num_experts']} experts, model.moe.num_experts "
                              f"is {layout.num_experts}")
    for name, t in tensors.items():
        rec = saved[name]
        shape = layout.global_shape(t)
        if rec["expert"] != is_expert(t) or rec["shape"] != shape:
            raise CheckpointError(f"checkpoint {path}: tensor '{name}' was saved with shape {rec['shape']} "
                                  f"(expert: {rec['expert']}), the model's is {shape} (expert: {is_expert(t)})")
        if manifest["optimizer"]["state_keys"] and rec["optimizer"] != zero.manages(t):
            raise CheckpointError(f"checkpoint {path}: parameter '{name}' is "
                                  f"{'not ' if zero.manages(t) else ''}trained by the optimizer now but "
                                  f"was{'' if rec['optimizer'] else ' not'} when saved (requires_grad changed?)")
    if ema is not None:
        absent = sorted(n for n in ema.state_dict() if not saved[n]["ema"])
        if absent:
            raise CheckpointError(f"checkpoint {path} holds no EMA of {absent[:5]}")


def _restore_schedule(engine: Any, manifest: dict[str, Any], path: Path) -> None:
    """DeepSpeed's step counters, and the lr schedule with the current lr of every param group."""
    counters = manifest["engine"]
    engine.global_steps = counters["global_steps"]
    engine.global_samples = counters["global_samples"]
    engine.skipped_steps = counters["skipped_steps"]
    engine.micro_steps = counters["global_steps"] * engine.gradient_accumulation_steps()
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is None or manifest["lr_scheduler"] is None:
        return  # a constant lr comes from the config (so it can be changed on resume)
    scheduler.load_state_dict(manifest["lr_scheduler"])
    saved = [g["lr"] for g in manifest["optimizer"]["param_groups"]]
    groups = engine.optimizer.param_groups
    if len(saved) != len(groups) and len(set(saved)) != 1:
        raise CheckpointError(f"checkpoint {path} has {len(saved)} optimizer param groups with different "
                              f"learning rates, this run has {len(groups)}")
    for i, group in enumerate(groups):
        group["lr"] = saved[i] if len(saved) == len(groups) else saved[0]


def _set_rng(data: bytes) -> None:
    state = torch.load(io.BytesIO(data), weights_only=True)
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Which checkpoint
# --------------------------------------------------------------------------------------------


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `root/latest` names; if it names no complete checkpoint (or is missing, e.g. a
    crash between the first folder rename and the first pointer write), the newest complete one; None
    when `root` holds no complete checkpoint."""
    root = Path(root)
    name = read_pointer(root) if root.is_dir() else None
    if name is not None and (root / name / MANIFEST).is_file():
        return root / name
    complete = complete_steps(root)
    if not complete:
        return None
    newest = complete[-1][1]
    if not dist.is_initialized() or dist.get_rank() == 0:
        said = f"points to {root / name}, which is not a complete checkpoint" if name else "is missing"
        log.warning("%s %s; using the newest complete checkpoint, %s", root / "latest", said, newest)
    return newest


def checkpoint_dir(run_dir: Path, step: int | None = None) -> Path:
    """`run_dir/checkpoints/step_N` for `step`, else the latest checkpoint; errors list what exists."""
    root = Path(run_dir) / "checkpoints"
    if step is None:
        path = latest_checkpoint(root)
        if path is None:
            raise CheckpointError(f"no checkpoint in {root}")
        return path
    path = root / step_dir_name(step)
    if not (path / MANIFEST).is_file():
        available = [s for s, _ in complete_steps(root)]
        raise CheckpointError(f"no complete checkpoint {path} (steps in {root}: {available or 'none'})")
    return path


def resolve_resume(cfg: Config) -> Path | None:
    """`train.resume`: "" -> None; "auto" -> the latest checkpoint under run_dir/checkpoints (None when
    there is none yet); anything else -> that checkpoint folder (error if it is not complete)."""
    spec = cfg.train.resume
    if spec == "":
        return None
    if spec == "auto":
        return latest_checkpoint(cfg.run_dir / "checkpoints")
    path = Path(spec)
    if not path.is_dir():
        raise CheckpointError(f"train.resume: checkpoint folder {path} does not exist")
    if not (path / MANIFEST).is_file():
        hint = " (a run's checkpoints are in RUN_DIR/checkpoints/step_XXXXXXX; or use train.resume=auto)"
        raise CheckpointError(f"train.resume: {path} is not a complete checkpoint (no {MANIFEST}){hint}")
    return path
