"""Saving: every rank writes its own pieces to its own file, in parallel; rank 0 publishes.

    path = save_checkpoint(root, step, engine, ema, train_state, cfg)     # collective, synchronous

    saver = Checkpointer(root, cfg)          # train.async_checkpoint picks the mode
    saver.save(step, engine, ema, train_state)   # collective; async: returns once the host copy is taken
    saver.poll()                             # collective, every step while saver.pending: publishes when done
    saver.wait()                             # collective: finish and publish the save in flight

A save is three agreements (parallel.checkpoint.agree) around local work:
1. rank 0 makes the temporary folder; every rank lists its pieces (views into its ZeRO partition,
   its EMA, tensors it owns) and, for an async save, copies them to host memory;
2. every rank streams its pieces into `rank_RRRRR.safetensors` (sha256 computed on the way out,
   fsync'd) — in a background thread for an async save, while training goes on;
3. rank 0 writes the manifest (with every rank's file record), renames the folder into place,
   moves `latest`, prunes old checkpoints.
`latest` therefore moves only after every rank's file is durable, and a failure anywhere leaves the
previous checkpoint untouched and raises the same CheckpointError on every rank.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from parallel.checkpoint import files
from parallel.checkpoint.agree import agree, attempt
from parallel.checkpoint.files import MANIFEST, CheckpointError
from parallel.checkpoint.layout import (FORMAT, RNG_KEY, VERSION, EMALike, Layout, Piece, complete_steps,
                                        layout_of, model_tensors, rank_file, rank_pieces, step_dir_name,
                                        tensor_table)
from parallel.checkpoint.zero_state import ZeroOptimizerState

if TYPE_CHECKING:
    from engine.config import Config

log = logging.getLogger(__name__)


@dataclass
class _Job:
    """One save between its agreements."""

    final: Path
    tmp: Path
    layout: Layout
    pieces: list[Piece]  # released once written
    manifest: dict[str, Any] | None  # rank 0: everything but the file list
    keep_last: int
    started: float = field(default_factory=time.monotonic)
    outcome: tuple[str | None, dict[str, Any] | None] = (None, None)  # _write's (error, file record)

    @property
    def what(self) -> str:
        return f"saving checkpoint {self.final}"


def save_checkpoint(ckpt_root: Path, step: int, engine: Any, ema: EMALike | None, train_state: dict,
                    cfg: Config, exclusive: bool = False) -> Path:
    """Write `ckpt_root/step_{step:07d}/`, then point `latest` at it and keep the newest
    `cfg.train.keep_checkpoints`. Collective: every rank calls it. Returns the folder.
    `exclusive`: the caller holds the run directory's lock (other owners' temporary folders are debris)."""
    job = _begin(Path(ckpt_root), step, engine, ema, train_state, cfg, host_copy=False, exclusive=exclusive)
    _write(job)
    return _finish(job)


class Checkpointer:
    """The trainer's saves: synchronous, or with `train.async_checkpoint` written in the background."""

    def __init__(self, ckpt_root: Path, cfg: Config, exclusive: bool = False):
        self.root, self.cfg, self.exclusive = Path(ckpt_root), cfg, exclusive
        self.asynchronous = cfg.train.async_checkpoint
        self._job: _Job | None = None
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> bool:
        """An async save is written or waits to be published (the same on every rank)."""
        return self._job is not None

    def save(self, step: int, engine: Any, ema: EMALike | None, train_state: dict) -> Path | None:
        """Collective. Synchronous: the published folder. Async: None; `poll`/`wait` publish it."""
        self.wait()  # one save in flight at most (bounds the host copies)
        job = _begin(self.root, step, engine, ema, train_state, self.cfg, host_copy=self.asynchronous,
                     exclusive=self.exclusive)
        if not self.asynchronous:
            _write(job)
            return _finish(job)
        self._job = job
        self._thread = threading.Thread(target=_write, args=(job,), name=f"checkpoint-{job.final.name}", daemon=True)
        self._thread.start()
        return None

    def poll(self) -> Path | None:
        """Collective (one tiny all-reduce): publish the pending save if every rank has written its file;
        the folder once published, else None."""
        if self._job is None or self._thread is None:
            return None
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        written = torch.tensor([0.0 if self._thread.is_alive() else 1.0], device=device)
        dist.all_reduce(written, op=dist.ReduceOp.MIN)
        return self.wait() if written.item() == 1.0 else None

    def wait(self) -> Path | None:
        """Collective: wait for the pending save's files and publish it; its folder (None if none was pending)."""
        if self._job is None or self._thread is None:
            return None
        job, thread = self._job, self._thread
        self._job = self._thread = None
        thread.join()
        return _finish(job)


def _begin(root: Path, step: int, engine: Any, ema: EMALike | None, train_state: dict, cfg: Config,
           host_copy: bool, exclusive: bool) -> _Job:
    """Agreement 1: the temporary folder exists and every rank knows what it writes."""
    final = root / step_dir_name(step)
    what = f"saving checkpoint {final}"

    def prepare() -> tuple[Any, ...]:
        try:
            json.dumps(train_state)  # the manifest is JSON on purpose (readable, portable): check on every rank
        except TypeError as e:
            raise CheckpointError(f"train_state must hold JSON values only ({e})") from None
        tensors = model_tensors(engine.module)
        zero = ZeroOptimizerState(engine)
        layout = layout_of(cfg, tensors)
        ema_state = ema.state_dict() if ema is not None else {}
        table = tensor_table(tensors, zero, ema_state, layout)
        pieces = rank_pieces(tensors, zero, ema_state, layout)
        if host_copy:  # training may change the originals while the background thread writes
            pieces = [(key, t.detach().to("cpu", copy=True), lo) for key, t, lo in pieces]
        pieces.append((RNG_KEY, torch.frombuffer(bytearray(_rng_bytes()), dtype=torch.uint8), -1))
        manifest = tmp = None
        if layout.rank == 0:
            manifest = _manifest(step, cfg, engine, layout, table, zero.tensor_keys(), train_state)
            tmp = _make_temp_dir(root, final, exclusive)
        return layout, pieces, manifest, tmp, zero.local_scalars()

    prepared, error = attempt(prepare)
    own_tmp = prepared[3] if prepared else None
    try:
        payloads = agree(what, error, None if prepared is None else (prepared[3], prepared[4]))
    except CheckpointError:
        _failed(own_tmp)
        raise
    layout, pieces, manifest, _, _ = prepared
    tmp = payloads[0][0]
    scalars = [s for _, rank_scalars in payloads for s in rank_scalars]
    if any(s != scalars[0] for s in scalars):  # the same data on every rank: every rank raises
        _failed(own_tmp)
        raise CheckpointError(f"{what} failed: optimizer scalar state differs between partitions: {scalars}")
    if manifest is not None:
        manifest["optimizer"]["scalars"] = scalars[0] if scalars else {}
    return _Job(final, tmp, layout, pieces, manifest, cfg.train.keep_checkpoints)


def _write(job: _Job) -> None:
    """Local (safe in a thread: no collectives): this rank's file; the outcome is kept on the job."""
    name = rank_file(job.layout.rank)

    def write() -> dict[str, Any]:
        record = files.write_safetensors(job.tmp / name, [(key, t) for key, t, _ in job.pieces])
        pieces = {key: [lo, lo + t.numel()] for key, t, lo in job.pieces if key != RNG_KEY}
        return {name: {**record, "rank": job.layout.rank, "pieces": pieces}}

    record, error = attempt(write)
    job.pieces = []  # drop the host copies now
    job.outcome = (error, record)


def _finish(job: _Job) -> Path:
    """Agreements 2 and 3: every rank's file is durable; rank 0 publishes."""
    own_tmp = job.tmp if job.layout.rank == 0 else None
    try:
        records = agree(job.what, *job.outcome)
    except CheckpointError:
        _failed(own_tmp)  # the previous checkpoint and `latest` are untouched
        raise
    published: Path | None = None
    if job.manifest is not None:
        job.manifest["files"] = {name: rec for rank_record in records for name, rec in sorted(rank_record.items())}
        published, error = attempt(_publish, job)
    else:
        error = None
    agree(job.what, error)
    if published is not None:
        size = sum(rec["bytes"] for rank_record in records for rec in rank_record.values())
        log.info("saved checkpoint %s (%.1f MB from %d ranks, %.1f s)", job.final, size / 2**20, len(records),
                 time.monotonic() - job.started)
    return job.final


def _make_temp_dir(root: Path, final: Path, exclusive: bool) -> Path:
    """Rank 0: a fresh temporary folder named after this process (debris of dead saves removed)."""
    tmp = files.temp_dir_for(final)
    try:
        root.mkdir(parents=True, exist_ok=True)
        files.remove_leftovers(root, exclusive)
        tmp.mkdir()
    except OSError as e:
        raise CheckpointError(f"cannot create {tmp}: {e.strerror or e}") from None
    return tmp


def _discard(tmp: Path | None) -> None:
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


def _failed(tmp: Path | None) -> None:
    """Every rank, after an agreement that failed: rank 0 removes the temporary folder (`tmp`), then all
    go on together, so no rank finds it afterwards."""
    _discard(tmp)
    try:
        dist.barrier()
    except RuntimeError:  # a peer is gone: the error being raised says so already
        pass


def _publish(job: _Job) -> Path:
    """Rank 0, once every file is durable: manifest, rename into place, `latest`, pruning."""
    try:
        files.write_durable(job.tmp / MANIFEST, json.dumps(job.manifest, indent=1).encode())
        files.publish_dir(job.tmp, job.final)
        files.write_pointer(job.final.parent, job.final.name)
        _prune(job.final.parent, job.keep_last, keep=job.final.name)
    except OSError as e:
        _discard(job.tmp)
        raise CheckpointError(f"cannot publish {job.final}: {e.strerror or e}") from None
    return job.final


def _prune(root: Path, keep_last: int, keep: str) -> None:
    """Delete complete step folders beyond the newest `keep_last` (never `keep`, the new `latest`)."""
    for _, path in complete_steps(root)[:-keep_last]:
        if path.name != keep:
            files.remove_dir(path)


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


def _manifest(step: int, cfg: Config, engine: Any, layout: Layout, table: dict[str, Any], state_keys: list[str],
              train_state: dict) -> dict[str, Any]:
    """Everything but the optimizer scalars (checked across ranks) and the file list (known once written)."""
    scheduler = getattr(engine, "lr_scheduler", None)
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
            "param_groups": [{"lr": g["lr"]} for g in engine.optimizer.param_groups],
        },
        "lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
        "engine": {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                   "skipped_steps": engine.skipped_steps},
        "train_state": train_state,
        "tensors": table,
        "config": dataclasses.asdict(cfg),
    }
