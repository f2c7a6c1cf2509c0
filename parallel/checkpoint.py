"""Checkpoints we own (DeepSpeed's own would save rank 0's module and drop every other rank's experts).

    path  = save_checkpoint(ckpt_root, step, engine, ema, train_state, cfg)   # collective
    state = load_checkpoint(path, engine, ema, cfg)                            # collective, reshards
    path  = resolve_resume(cfg)                                                # train.resume

One folder per step, `ckpt_root/step_XXXXXXX/`:

    dense.safetensors                 every non-expert tensor, whole (ZeRO partitions consolidated):
                                      model/<name> (fp32 master weight, buffers as they are),
                                      <state>/<name> (exp_avg, exp_avg_sq), ema/<name>
    experts_AAAA-BBBB.safetensors     the same for global experts AAAA..BBBB (one expert-parallel shard),
                                      tensors stacked with dim 0 = expert; written by the first rank
                                      of that shard's expert-data-parallel group
    rng/rank_RRRRR.pt                 each rank's torch / CUDA / numpy / python RNG states
    manifest.json                     step, config, world and expert-parallel sizes, tensor table
                                      (global shapes, expert or not), files (experts held, sha256),
                                      optimizer scalars, lr schedule, train_state (data position)

`latest` (next to the step folders) names the newest complete checkpoint. Atomicity: see
`parallel.checkpoint_io`. Loading reads the dense file and the expert files that cover this rank's
experts, so any `parallel.ep_size` dividing `model.moe.num_experts`, at any world size, can load
a checkpoint saved at any other. RNG states are restored only at the saving world size (the
training randomness is addressed by sample index, `engine/rng.py`, so it does not depend on them).
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import random
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist

from parallel.checkpoint_io import (MANIFEST, CheckpointError, fsync_dir, fsync_file, publish_dir, read_pointer,
                                    remove_dir, remove_leftovers, sha256_file, temp_dir_for, verify_file,
                                    write_durable, write_pointer)
from parallel.groups import create_groups
from parallel.zero_state import ZeroOptimizerState

if TYPE_CHECKING:
    from engine.config import Config

__all__ = ["CheckpointError", "CheckpointReader", "save_checkpoint", "load_checkpoint", "resolve_resume",
           "checkpoint_dir", "latest_checkpoint", "read_manifest", "verify_checkpoint", "step_dir_name"]

log = logging.getLogger(__name__)

FORMAT = "diffmoe-checkpoint"
VERSION = 1
DENSE_FILE = "dense.safetensors"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class EMALike(Protocol):
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _expert_file(first: int, last: int) -> str:
    return f"experts_{first:04d}-{last:04d}.safetensors"


def _rng_file(rank: int) -> str:
    return f"rng/rank_{rank:05d}.pt"


def _is_expert(t: torch.Tensor) -> bool:
    return bool(getattr(t, "_is_expert", False))


@dataclass(frozen=True)
class _Layout:
    """Where this rank sits: which experts it holds and which files it writes."""

    rank: int
    world_size: int
    ep_rank: int
    ep_size: int
    num_experts: int
    first_of_expert_dp: bool  # writes its expert-parallel shard's file

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def expert_ids(self) -> list[int]:
        return list(range(self.ep_rank * self.local_experts, (self.ep_rank + 1) * self.local_experts))


def _layout(cfg: Config, tensors: dict[str, torch.Tensor]) -> _Layout:
    groups = create_groups(cfg.parallel.ep_size)  # the trainer's groups (created once, returned again)
    layout = _Layout(groups.rank, groups.world_size, groups.ep_rank, groups.ep_size, cfg.model.moe.num_experts,
                     groups.expert_dp_rank == 0)
    for name, t in tensors.items():
        if _is_expert(t) and (t.dim() == 0 or t.shape[0] != layout.local_experts):
            raise CheckpointError(f"expert tensor '{name}' has shape {tuple(t.shape)}; expected dim 0 = "
                                  f"{layout.local_experts} local experts (model.moe.num_experts="
                                  f"{layout.num_experts} / parallel.ep_size={layout.ep_size})")
    return layout


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers under their state-dict names (the objects themselves)."""
    return model.state_dict(keep_vars=True)


def _agree(error: str | None, what: str) -> None:
    """Collective: raise on every rank if any rank failed, so no rank waits alone in a later collective."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    _raise_if_any(errors, what)


def _raise_if_any(errors: list[str | None], what: str) -> None:
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        first = failed[0][1]
        others = f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""
        raise CheckpointError(f"{what} failed on rank {failed[0][0]}{others}: {first}")


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------


def save_checkpoint(ckpt_root: Path, step: int, engine: Any, ema: EMALike | None, train_state: dict,
                    cfg: Config) -> Path:
    """Write `ckpt_root/step_{step:07d}/` atomically, then point `latest` at it and keep the newest
    `cfg.train.keep_checkpoints`. Collective: every rank calls it. Returns the folder."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / step_dir_name(step)
    tmp = temp_dir_for(final)
    what = f"saving checkpoint {final}"
    started = time.monotonic()
    tensors = _model_tensors(engine.module)
    zero = ZeroOptimizerState(engine)
    layout = _layout(cfg, tensors)
    _agree(_make_temp_dir(ckpt_root, tmp) if layout.rank == 0 else None, what)

    # Gathering is collective (each optimizer parameter over its data-parallel group); writing is not.
    dense, experts, table, state_keys = _collect(tensors, zero, ema, layout)
    manifest = _manifest(step, cfg, engine, layout, table, state_keys, zero.scalar_state(), train_state)
    files: dict[str, dict[str, Any]] = {}
    error = None
    try:
        json.dumps(train_state)  # the manifest is JSON on purpose (readable, portable): check on every rank
        if layout.rank == 0:
            files[DENSE_FILE] = _write_tensors(tmp / DENSE_FILE, dense, None)
        if experts and layout.first_of_expert_dp:
            ids = layout.expert_ids
            files[_expert_file(ids[0], ids[-1])] = _write_tensors(tmp / _expert_file(ids[0], ids[-1]), experts, ids)
        rng_name = _rng_file(layout.rank)
        files[rng_name] = _record(write_durable(tmp / rng_name, _rng_bytes()), tmp / rng_name, None)
    except TypeError as e:
        error = f"train_state must hold JSON values only ({e})"
    except (OSError, ValueError) as e:
        error = str(e)
    everyone: list[Any] = [None] * layout.world_size
    dist.all_gather_object(everyone, (error, files))
    _raise_if_any([e for e, _ in everyone], what)  # on every rank; the previous checkpoint is untouched
    all_files = {name: rec for _, rank_files in everyone for name, rec in rank_files.items()}
    manifest["files"] = dict(sorted(all_files.items()))
    _agree(_publish(tmp, final, manifest, cfg.train.keep_checkpoints) if layout.rank == 0 else None, what)
    if layout.rank == 0:
        size = sum(rec["bytes"] for rec in all_files.values())
        log.info("saved checkpoint %s (%.1f MB, %.1f s)", final, size / 2**20, time.monotonic() - started)
    return final


def _make_temp_dir(ckpt_root: Path, tmp: Path) -> str | None:
    """Rank 0: a fresh temporary folder (debris of interrupted saves removed); an error message or None."""
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        remove_leftovers(ckpt_root)
        tmp.mkdir()
    except OSError as e:
        return f"cannot create {tmp}: {e}"
    return None


def _publish(tmp: Path, final: Path, manifest: dict[str, Any], keep_last: int) -> str | None:
    """Rank 0, once every file is on disk: manifest, rename into place, `latest`, pruning."""
    try:
        write_durable(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        fsync_dir(tmp / "rng")
        publish_dir(tmp, final)
        write_pointer(final.parent, final.name)
        _prune(final.parent, keep_last, keep=final.name)
    except (OSError, TypeError, ValueError) as e:
        return f"cannot publish {final}: {e}"
    return None


def _collect(tensors: dict[str, torch.Tensor], zero: ZeroOptimizerState, ema: EMALike | None, layout: _Layout
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """Whole tensors for the files this rank writes: (dense, experts, tensor table, optimizer state keys)."""
    state_keys = zero.tensor_keys()
    dense: dict[str, torch.Tensor] = {}
    experts: dict[str, torch.Tensor] = {}
    table: dict[str, Any] = {}
    ema_state = ema.state_dict() if ema is not None else {}
    unknown = sorted(set(ema_state) - set(tensors))
    if unknown:
        raise CheckpointError(f"EMA tensors {unknown[:5]} are not model tensors")
    for name, t in tensors.items():
        expert = _is_expert(t)
        keeps = layout.first_of_expert_dp if expert else layout.rank == 0
        out = experts if expert else dense
        in_optimizer = zero.manages(t)
        if in_optimizer:
            master = zero.gather(t, None)
            moments = {key: zero.gather(t, key) for key in state_keys}
        if keeps:
            out[f"model/{name}"] = master if in_optimizer else t.detach().cpu().clone()
            if in_optimizer:
                out.update({f"{key}/{name}": value for key, value in moments.items()})
            if name in ema_state:
                out[f"ema/{name}"] = ema_state[name].detach().cpu().clone()
        shape = list(t.shape)
        if expert:
            shape[0] = layout.num_experts
        saved_dtype = torch.float32 if in_optimizer else t.dtype  # trained parameters: their fp32 master
        table[name] = {"shape": shape, "dtype": str(saved_dtype).removeprefix("torch."), "expert": expert,
                       "optimizer": in_optimizer, "ema": name in ema_state}
    return dense, experts, table, state_keys


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], expert_ids: list[int] | None) -> dict[str, Any]:
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    fsync_file(path)
    return _record(sha256_file(path), path, expert_ids)


def _record(sha256: str, path: Path, expert_ids: list[int] | None) -> dict[str, Any]:
    return {"sha256": sha256, "bytes": path.stat().st_size, "experts": expert_ids}


def _rng_bytes() -> bytes:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _set_rng(data: bytes) -> None:
    state = torch.load(io.BytesIO(data), weights_only=True)
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _engine_lr_scheduler(engine: Any) -> Any:
    return getattr(engine, "lr_scheduler", None)


def _manifest(step: int, cfg: Config, engine: Any, layout: _Layout, table: dict[str, Any],
              state_keys: list[str], scalars: dict[str, Any], train_state: dict) -> dict[str, Any]:
    """Everything but the file list, which is known once every rank has written."""
    scheduler = _engine_lr_scheduler(engine)
    return {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "world_size": layout.world_size,
        "ep_size": layout.ep_size,
        "num_experts": layout.num_experts,
        "zero_stage": cfg.parallel.zero_stage,
        "optimizer": {
            "state_keys": state_keys,
            "scalars": scalars,
            "param_groups": [{"lr": g["lr"]} for g in engine.optimizer.param_groups],
        },
        "lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
        "engine": {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                   "skipped_steps": engine.skipped_steps},
        "train_state": train_state,
        "tensors": table,
        "config": dataclasses.asdict(cfg),
    }


def _prune(root: Path, keep_last: int, keep: str) -> None:
    """Delete complete step folders beyond the newest `keep_last` (never `keep`, the new `latest`)."""
    complete = sorted((int(m.group(1)), p) for p in root.iterdir()
                      if (m := _STEP_DIR.match(p.name)) and (p / MANIFEST).is_file())
    for _, path in complete[:-keep_last]:
        if path.name != keep:
            remove_dir(path)


# --------------------------------------------------------------------------------------------
# Read
# --------------------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint folder `path`; errors name the folder."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete checkpoint: no {MANIFEST}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / MANIFEST} is unreadable: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{path / MANIFEST}: not a {FORMAT} v{VERSION} manifest "
                              f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})")
    return manifest


class CheckpointReader:
    """A checkpoint's tensors, read one at a time from its memory-mapped safetensors files (peak memory:
    one tensor, not the checkpoint). Checksums are checked by `verify`, once per file, before reading.

        with CheckpointReader(path, manifest) as reader:
            reader.verify(reader.file_names())
            w = reader.dense("model/final_layer.linear.weight")
            e = reader.experts("exp_avg/blocks.1.ffn.experts.w1", [2, 3])   # rows of experts 2 and 3
    """

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path, self.manifest = Path(path), manifest
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        if DENSE_FILE not in manifest["files"]:
            raise CheckpointError(f"{self.path / MANIFEST} lists no {DENSE_FILE}")
        # (first expert, last expert, file) of the expert-parallel shard files, in expert order
        self._shards = sorted((rec["experts"][0], rec["experts"][-1], name)
                              for name, rec in manifest["files"].items() if rec["experts"])

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def file_names(self) -> list[str]:
        return sorted(self.manifest["files"])

    def verify(self, names: list[str]) -> None:
        for name in names:
            verify_file(self.path / name, self.manifest["files"][name]["sha256"])

    def dense(self, key: str) -> torch.Tensor:
        return self._read(DENSE_FILE, key, None)

    def experts(self, key: str, expert_ids: list[int]) -> torch.Tensor:
        """Rows of `expert_ids` (a contiguous ascending range of global expert ids) stacked along dim 0."""
        pieces = []
        for first, last, name in self._shards:
            lo, hi = max(first, expert_ids[0]), min(last, expert_ids[-1])
            if lo <= hi:
                pieces.append(self._read(name, key, (lo - first, hi - first + 1)))
        got = sum(p.shape[0] for p in pieces)
        if got != len(expert_ids):
            raise CheckpointError(f"checkpoint {self.path} holds {got} of experts {expert_ids[0]}..{expert_ids[-1]} "
                                  f"for '{key}'")
        return torch.cat(pieces)

    def _read(self, name: str, key: str, rows: tuple[int, int] | None) -> torch.Tensor:
        file = self.path / name
        try:
            if name not in self._handles:
                self._handles[name] = self._stack.enter_context(safetensors.safe_open(str(file), framework="pt"))
            handle = self._handles[name]
            return handle.get_tensor(key) if rows is None else handle.get_slice(key)[rows[0]:rows[1]]
        except Exception as e:  # safetensors raises its own error types (missing key, malformed file)
            raise CheckpointError(f"cannot read '{key}' from checkpoint file {file}: {e}") from None


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check every file of checkpoint folder `path` against the manifest; returns the manifest."""
    manifest = read_manifest(path)
    with CheckpointReader(path, manifest) as reader:
        reader.verify(reader.file_names())
    return manifest


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------


def load_checkpoint(path: Path, engine: Any, ema: EMALike | None, cfg: Config) -> dict:
    """Restore weights, optimizer state, EMA, lr schedule and RNG from checkpoint folder `path`, resharding
    experts to this run's layout; returns the saved `train_state`. Collective: every rank calls it."""
    path = Path(path)
    tensors = _model_tensors(engine.module)
    zero = ZeroOptimizerState(engine)
    layout = _layout(cfg, tensors)
    what = f"loading checkpoint {path}"
    error, manifest = None, {}
    try:
        manifest = read_manifest(path)
        _check_compatible(path, manifest, tensors, zero, ema, layout)
        # Each file is checksummed once in the job, by rank (its index % world size), in parallel.
        with CheckpointReader(path, manifest) as reader:
            reader.verify(reader.file_names()[layout.rank::layout.world_size])
    except CheckpointError as e:
        error = str(e)
    _agree(error, what)

    with CheckpointReader(path, manifest) as reader:
        def read(key: str, expert: bool) -> torch.Tensor:
            return reader.experts(key, layout.expert_ids) if expert else reader.dense(key)

        opt = manifest["optimizer"]
        scalars = {k: tuple(v) for k, v in opt["scalars"].items()}
        if opt["state_keys"] or scalars:
            zero.prepare_state(opt["state_keys"], scalars)
        with torch.no_grad():
            for name, t in tensors.items():
                value = read(f"model/{name}", _is_expert(t))
                if manifest["tensors"][name]["optimizer"]:
                    zero.set(t, None, value)
                    for key in opt["state_keys"]:
                        zero.set(t, key, read(f"{key}/{name}", _is_expert(t)))
                t.copy_(value)
        if ema is not None:
            ema.load_state_dict({name: read(f"ema/{name}", _is_expert(tensors[name])) for name in ema.state_dict()})
    _restore_schedule(engine, manifest, path)
    if manifest["world_size"] == layout.world_size:
        _set_rng((path / _rng_file(layout.rank)).read_bytes())
    elif layout.rank == 0:
        log.info("checkpoint %s was saved at world size %d: RNG states not restored (training draws are "
                 "addressed by sample index and do not depend on them)", path, manifest["world_size"])
    dist.barrier()
    if layout.rank == 0:
        log.info("loaded checkpoint %s (step %d, saved at world %d / ep_size %d)", path, manifest["step"],
                 manifest["world_size"], manifest["ep_size"])
    return manifest["train_state"]


def _check_compatible(path: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor],
                      zero: ZeroOptimizerState, ema: EMALike | None, layout: _Layout) -> None:
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
        shape = list(t.shape)
        if _is_expert(t):
            shape[0] = layout.num_experts
        if rec["expert"] != _is_expert(t) or rec["shape"] != shape:
            raise CheckpointError(f"checkpoint {path}: tensor '{name}' was saved with shape {rec['shape']} "
                                  f"(expert: {rec['expert']}), the model's is {shape} (expert: {_is_expert(t)})")
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
    scheduler = _engine_lr_scheduler(engine)
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


# --------------------------------------------------------------------------------------------
# Which checkpoint
# --------------------------------------------------------------------------------------------


def _complete_steps(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir()
                  if (m := _STEP_DIR.match(p.name)) and (p / MANIFEST).is_file())


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `root/latest` names; if it names no complete checkpoint (or is missing, e.g. a
    crash between the first folder rename and the first pointer write), the newest complete one; None
    when `root` holds no complete checkpoint."""
    root = Path(root)
    name = read_pointer(root) if root.is_dir() else None
    if name is not None and (root / name / MANIFEST).is_file():
        return root / name
    complete = _complete_steps(root)
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
        available = [s for s, _ in _complete_steps(root)]
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
