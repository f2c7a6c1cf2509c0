"""The run directory: `train.output_dir` (default runs/<config name>).

    tb/            TensorBoard events            metrics.jsonl   one JSON object per logged step
    checkpoints/   step_XXXXXXX/ + latest        samples/        PNG grids of the EMA model
    config.yaml    the resolved config that ran  run.lock        which job trains here now

One job at a time: rank 0 takes `run.lock` (job id, host, pid) before anything is written, and a
second job on the same folder refuses to start with one line naming the holder. A lock whose holder
is gone is taken over:
- the same job id (a requeued Slurm job keeps its id; a restarted step of the same job): always;
- a holder on this host: when its pid is not running, or runs another program now (start time);
- a Slurm job on another host: when `scontrol show job ID` says it is not running (any JobState but
  RUNNING, SUSPENDED, COMPLETING, CONFIGURING, RESIZING, SIGNALING, STAGE_OUT) or no longer knows it;
- anything else (another host and no Slurm to ask): never automatically; the refusal says which file
  to delete once you know that job is gone.
Creating the lock is atomic on any POSIX file system (a hard link of a complete file), NFS and
Lustre included; the file goes at the end of the run whatever the exit (done, error, requeue).
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.config import ConfigError, save_config

if TYPE_CHECKING:
    from engine.config import Config

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"

# JobState values (`scontrol show job`) of a Slurm job that still runs somewhere.
SLURM_LIVE_STATES = frozenset({"RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "RESIZING", "SIGNALING",
                               "STAGE_OUT"})


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


class RunLockError(RuntimeError):
    """Another live job holds the run directory (or its lock file cannot be read or written)."""


@dataclass(frozen=True)
class LockHolder:
    """What run.lock records about the job holding it."""

    job_id: str
    host: str
    pid: int
    pid_start: str  # the process's start time (/proc/PID/stat), tells a reused pid from the holder
    slurm: bool  # job_id is a Slurm job id, so `scontrol show job` can say whether it still runs
    since: str  # UTC time the lock was taken (for people reading the file)

    @classmethod
    def this_process(cls) -> LockHolder:
        pid, host = os.getpid(), socket.gethostname()
        slurm_job = os.environ.get("SLURM_JOB_ID", "")
        return cls(slurm_job or f"{host}-{pid}", host, pid, _process_start(pid), bool(slurm_job),
                   datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))

    def describe(self) -> str:
        return f"job {self.job_id} (host {self.host}, pid {self.pid}, since {self.since})"


def job_id() -> str:
    """This job's id as the lock records it: Slurm's job id (kept across requeues), else `<host>-<pid>`
    of this process. `run_dir_lock` yields rank 0's value, the same on every rank."""
    return LockHolder.this_process().job_id


@contextmanager
def run_dir_lock(run: Path, is_main: bool) -> Iterator[str]:
    """Hold `run` (train.output_dir) for this job while the block runs; yields the job id.

    Collective: rank 0 takes the lock and every rank learns the outcome, so all leave together when
    another live job holds the folder: rank 0 raises RunLockError (one line naming the holder), the
    other ranks exit with the same code silently. The lock goes when the block exits, however it exits."""
    me = LockHolder.this_process()
    path = run / LOCK_FILE
    outcome = {"job_id": me.job_id, "error": ""}
    if is_main:
        try:
            run.mkdir(parents=True, exist_ok=True)
            _acquire(path, me)
        except RunLockError as e:
            outcome["error"] = str(e)
        except OSError as e:
            outcome["error"] = f"train.output_dir: cannot lock {path}: {e}"
    outcome = _from_main(outcome)
    if outcome["error"]:
        if is_main:
            raise RunLockError(outcome["error"])
        raise SystemExit(1)  # rank 0 reports it: one line, not one per rank
    try:
        yield outcome["job_id"]
    finally:
        if is_main:
            _release(path, me)


def _from_main(value: dict[str, str]) -> dict[str, str]:
    """Rank 0's `value` on every rank (a no-op in a single process). The barrier keeps a refused
    rank 0 from leaving before every rank has the outcome."""
    dist = sys.modules.get("torch.distributed")  # never imported: no process group (and no torch to load)
    if dist is None or not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    if box[0]["error"]:
        dist.barrier()
    return box[0]


def _acquire(path: Path, me: LockHolder) -> None:
    """Create `path` for `me`, or take it over from a job that is gone; RunLockError if one is not."""
    mine = path.with_name(f".{path.name}.{me.host}.{me.pid}")
    mine.write_text(json.dumps(asdict(me)) + "\n")
    try:
        for _ in range(3):  # a retry only when another job changed the lock between two of our steps
            try:
                os.link(mine, path)  # atomic create-if-absent, with the whole record in place
                return
            except FileExistsError:
                pass
            holder = _read(path)
            if holder is None:
                continue
            if holder.job_id == me.job_id:
                os.replace(mine, path)
                log.warning("%s: taken back from an earlier run of this job (%s)", path, holder.describe())
                return
            gone, why = _holder_gone(holder, me.host)
            if not gone:
                raise RunLockError(f"train.output_dir: {path.parent} is in use by {holder.describe()}: {why}; wait "
                                   f"for it or choose another train.output_dir (if that job is gone, delete {path})")
            if _remove_if_unchanged(path, holder, me):
                log.warning("%s: taking over from %s: %s", path, holder.describe(), why)
        raise RunLockError(f"{path}: other jobs are taking this lock at the same moment; start one job per "
                           "train.output_dir")
    finally:
        mine.unlink(missing_ok=True)


def _read(path: Path) -> LockHolder | None:
    """The holder recorded in `path`; None when the file is gone (released meanwhile)."""
    try:
        return LockHolder(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as e:
        raise RunLockError(f"{path} is not a lock written by engine/train.py ({e}); delete it if no job trains "
                           f"in {path.parent}") from None


def _holder_gone(holder: LockHolder, host: str) -> tuple[bool, str]:
    """(whether the holder's job has ended, why we think so / why we cannot tell)."""
    if holder.host == host:
        if not _pid_running(holder.pid):
            return True, f"pid {holder.pid} is not running on {host}"
        if holder.pid_start and _process_start(holder.pid) != holder.pid_start:
            return True, f"pid {holder.pid} on {host} is another process now"
        return False, f"pid {holder.pid} is running on {host}"
    if not holder.slurm:
        return False, f"it runs on another host ({holder.host}) outside Slurm, so its state is unknown here"
    state = _slurm_job_state(holder.job_id)
    if state is None:
        return False, f"`scontrol show job {holder.job_id}` could not tell whether it still runs"
    if state in SLURM_LIVE_STATES:
        return False, f"Slurm reports it {state}"
    return True, f"Slurm reports it {state}"


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def _process_start(pid: int) -> str:
    """The start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat); "" off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name start at field 3


def _slurm_job_state(job: str) -> str | None:
    """JobState of a Slurm job per `scontrol show job`; "PURGED" when Slurm no longer knows the id;
    None when scontrol is missing or fails otherwise."""
    try:
        result = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return "PURGED" if "invalid job id" in result.stderr.lower() else None
    found = re.search(r"\bJobState=(\w+)", result.stdout)
    return found.group(1) if found else None


def _remove_if_unchanged(path: Path, holder: LockHolder, me: LockHolder) -> bool:
    """Remove the stale lock of `holder`, unless another job replaced it since we read it (then that
    lock is put back). The rename makes only one of several jobs taking over at once remove it."""
    aside = path.with_name(f".{path.name}.stale.{me.host}.{me.pid}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    try:
        if _read(aside) == holder:
            return True
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        return False
    finally:
        aside.unlink(missing_ok=True)


def _release(path: Path, me: LockHolder) -> None:
    """Delete the lock if it is still ours (never another job's that took over meanwhile)."""
    try:
        if _read(path) == me:
            path.unlink()
    except (OSError, RunLockError) as e:
        log.warning("could not release %s: %s", path, e)
