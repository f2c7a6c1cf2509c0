"""Run test functions on N real processes joined by a gloo process group on 127.0.0.1.

    with DistributedPool(2) as pool:              # spawns 2 ranks once (a pytest fixture can hold it)
        results = pool.run(my_check, arg1, arg2)  # my_check(*args) on every rank -> [rank0, rank1]

    results = run_distributed(my_check, 2, arg1)  # one-shot: spawn, run, shut down

`fn` must be a module-level (importable) function; it runs with the default process group
initialised (gloo, loopback, a free port), RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
set (so `deepspeed.initialize` works inside), one CPU thread per rank. Its return value must be
picklable (move tensors to CPU). An exception on any rank fails `run` with every rank's traceback,
and the pool restarts its processes for the next call, since a failed collective leaves the group
unusable.
"""
from __future__ import annotations

import datetime
import os
import queue
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from parallel.zero import free_port

COLLECTIVE_TIMEOUT_S = 60  # a rank stuck in a collective gives up after this long


def _worker(rank: int, world_size: int, port: int, tasks: Any, results: Any) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        while (task := tasks.get()) is not None:
            fn, args, kwargs = task
            try:
                results.put((rank, True, fn(*args, **kwargs)))
            except BaseException:
                results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class DistributedPool:
    """N spawned ranks that stay up between `run` calls (one process group per pool)."""

    def __init__(self, world_size: int, timeout_s: float = 300):
        self.world_size, self.timeout_s = world_size, timeout_s
        self._procs: list[Any] = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [ctx.Process(target=_worker, args=(r, self.world_size, port, self._tasks[r], self._results),
                                   daemon=True) for r in range(self.world_size)]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """`fn(*args, **kwargs)` on every rank; returns the per-rank results in rank order."""
        if not self._procs:
            self._start()
        for q in self._tasks:
            q.put((fn, args, kwargs))
        got: dict[int, tuple[bool, Any]] = {}
        try:
            while len(got) < self.world_size:
                rank, ok, value = self._results.get(timeout=self.timeout_s)
                got[rank] = (ok, value)
        except queue.Empty:
            self.close()
            raise TimeoutError(f"{fn.__name__} did not finish on ranks {sorted(set(range(self.world_size)) - set(got))} "
                               f"within {self.timeout_s} s") from None
        failures = [f"--- rank {r} ---\n{v}" for r, (ok, v) in sorted(got.items()) if not ok]
        if failures:
            self.close()
            raise AssertionError(f"{fn.__name__} failed on {len(failures)} rank(s):\n" + "\n".join(failures))
        return [got[r][1] for r in range(self.world_size)]

    def close(self) -> None:
        """Stop the ranks (they are restarted by the next `run`)."""
        for q in self._tasks if self._procs else []:
            q.put(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        self._procs = []

    def __enter__(self) -> DistributedPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, **kwargs: Any) -> list[Any]:
    """Spawn `world_size` ranks, run `fn(*args, **kwargs)` on each, shut them down; per-rank results."""
    with DistributedPool(world_size) as pool:
        return pool.run(fn, *args, **kwargs)
