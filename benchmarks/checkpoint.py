"""Checkpoint save and load on W gloo ranks (W = 1, 2, 4): time, who writes how much, host memory.

    python benchmarks/checkpoint.py            # DiffMoE DiT of ~150M params (12 blocks, d=512, 8 experts every
                                               # 2nd block, ep_size 2 at W >= 2), worlds 1, 2, 4
    python benchmarks/checkpoint.py --quick    # ~13M params, world 4 only (a couple of minutes)

Each world builds the trainer's DeepSpeed ZeRO-2 engine on every rank (fp32, AdamW state filled),
then measures on every rank:
- `save_s`: a synchronous `save_checkpoint` (wall clock, slowest rank), folder published;
- `load_s`: `load_checkpoint` of it into the same engines (checksums included; the files are in the
  page cache, so this is the CPU side of a load, not the file system's);
- bytes written per rank (from the manifest): `busiest_rank_share` = busiest rank / total (goal <= 1.5/W);
- peak extra host memory during the sync save: RSS sampled every 2 ms by a thread (/proc/self/statm)
  minus the RSS just before the save, per rank, over the bytes that rank writes
  (`peak_extra_host_ratio`, the largest over ranks; goal <= 1.5). Written pages sit in the page
  cache, which RSS does not count;
- async save (`train.async_checkpoint`): `async_blocked_s`, the time the training loop is held (the
  save call: host copy + one agreement; plus the per-step polls) while the ranks run steps of
  `--step-ms` of busy work until it is published; `async_publish_s`, save call to published; and its
  `async_peak_extra_host_ratio` (the host copy: about 1).
The last stdout line is JSON: the largest world's numbers plus one record per world.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import update_results  # noqa: E402
from parallel.zero import free_port  # noqa: E402

MODELS = {  # DiffMoE DiT on 32x32x4 latents (ImageNet-256's), patch 2: 256 tokens
    "default": ["model.depth=12", "model.hidden_size=512", "model.num_heads=8"],
    "quick": ["model.depth=4", "model.hidden_size=256", "model.num_heads=4"],
}
COMMON = ["model.input_size=32", "model.in_channels=4", "model.num_classes=1000", "model.moe.routing=diffmoe",
          "model.moe.num_experts=8", "model.moe.every=2", "parallel.backend=gloo", "parallel.zero_stage=2",
          "train.precision=fp32", "train.keep_checkpoints=1"]


class PeakRSS:
    """Largest resident set size of this process while the block runs, sampled by a thread."""

    def __init__(self, period_s: float = 0.002):
        self.period_s = period_s
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.period_s)

    def __enter__(self) -> PeakRSS:
        self.start = self.rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def extra(self) -> int:
        return self.peak - self.start


def busy_step(ms: float) -> None:
    """Stand-in for a training step: `ms` of matrix products on this rank's thread."""
    a = torch.randn(256, 256)
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)


def build(overrides: list[str]):
    """The trainer's engine and EMA with AdamW state present (as after a step), without training."""
    from engine.config import load_config
    from engine.ema import EMA
    from models import build_model
    from parallel.checkpoint.zero_state import ZeroOptimizerState
    from parallel.expert_parallel import attach_expert_parallel, optimizer_param_groups
    from parallel.groups import create_groups
    from parallel.zero import batch_layout, init_distributed, initialize_engine

    cfg = load_config(None, overrides)
    ctx = init_distributed(cfg)
    groups = create_groups(cfg.parallel.ep_size)
    torch.manual_seed(0)
    model = build_model(cfg, groups.ep_rank, groups.ep_size)
    attach_expert_parallel(model, cfg, groups)
    mb, accum = batch_layout(cfg, ctx.world_size)
    engine = initialize_engine(model, optimizer_param_groups(model, cfg), cfg, mb, accum, ctx)
    ZeroOptimizerState(engine).prepare_state(["exp_avg", "exp_avg_sq"], {"step": ("tensor", 1.0)})
    return cfg, engine, EMA(engine.module)


def measure(overrides: list[str], root: str, step_ms: float) -> dict[str, Any]:
    """One rank's measurements (runs on every rank)."""
    import torch.distributed as dist

    from parallel.checkpoint import Checkpointer, load_checkpoint, read_manifest, save_checkpoint

    cfg, engine, ema = build(overrides)
    rank = dist.get_rank()
    dist.barrier()
    with PeakRSS() as rss:
        start = time.perf_counter()
        path = save_checkpoint(Path(root), 1, engine, ema, {"step": 1}, cfg)
        save_s = time.perf_counter() - start
    manifest = read_manifest(path)
    written = manifest["files"]
    params = sum(math.prod(rec["shape"]) for rec in manifest["tensors"].values() if rec["optimizer"])
    mine = written[f"rank_{rank:05d}.safetensors"]["bytes"]
    dist.barrier()
    start = time.perf_counter()
    load_checkpoint(path, engine, ema, cfg)
    load_s = time.perf_counter() - start

    saver = Checkpointer(Path(root), dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                                       async_checkpoint=True)))
    dist.barrier()
    with PeakRSS() as async_rss:
        start = time.perf_counter()
        saver.save(2, engine, ema, {"step": 2})
        blocked = time.perf_counter() - start
        steps, published = 0, None
        while published is None:
            busy_step(step_ms)
            steps += 1
            poll_start = time.perf_counter()
            published = saver.poll()
            blocked += time.perf_counter() - poll_start
        publish_s = time.perf_counter() - start
    return {"rank": rank, "params": params, "save_s": save_s, "load_s": load_s, "bytes": mine,
            "all_bytes": sum(rec["bytes"] for rec in written.values()), "extra_rss": rss.extra,
            "async_blocked_s": blocked, "async_publish_s": publish_s, "async_steps": steps,
            "async_extra_rss": async_rss.extra}


def _rank_main(rank: int, world: int, port: int, fn_args: tuple, results: Any) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        results.put(measure(*fn_args))
    finally:
        dist.destroy_process_group()


def run_world(world: int, model: str, step_ms: float) -> dict[str, Any]:
    """Measure at `world` ranks; the per-world record (slowest / largest over ranks)."""
    overrides = COMMON + MODELS[model] + [f"parallel.ep_size={min(world, 2)}",
                                          f"train.global_batch_size={world}"]
    root = tempfile.mkdtemp(prefix="ckpt_bench_")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, (overrides, root, step_ms), results))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        ranks = []
        while len(ranks) < world:
            try:
                ranks.append(results.get(timeout=30))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError(f"a rank failed at world {world}: exit codes {[p.exitcode for p in procs]}")
    finally:
        for p in procs:
            p.join(timeout=60)
        shutil.rmtree(root, ignore_errors=True)
    total = ranks[0]["all_bytes"]
    return {
        "world": world,
        "params": ranks[0]["params"],
        "total_bytes": total,
        "busiest_rank_share": max(r["bytes"] for r in ranks) / total,
        "peak_extra_host_ratio": max(r["extra_rss"] / r["bytes"] for r in ranks),
        "save_s": max(r["save_s"] for r in ranks),
        "load_s": max(r["load_s"] for r in ranks),
        "async_blocked_s": max(r["async_blocked_s"] for r in ranks),
        "async_publish_s": max(r["async_publish_s"] for r in ranks),
        "async_steps": ranks[0]["async_steps"],
        "async_peak_extra_host_ratio": max(r["async_extra_rss"] / r["bytes"] for r in ranks),
    }


def report(records: list[dict[str, Any]], model: str, step_ms: float) -> str:
    rows = ["| world | total written | busiest rank share (goal <= 1.5/W) | peak extra host / bytes written "
            "(goal <= 1.5) | save s | load s | async: training blocked s | async: save to published s | "
            "async: peak extra host / bytes written |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        w = r["world"]
        rows.append(f"| {w} | {r['total_bytes'] / 2**20:.0f} MiB | {r['busiest_rank_share']:.3f} (goal "
                    f"{1.5 / w:.3f}) | {r['peak_extra_host_ratio']:.3f} | {r['save_s']:.2f} | {r['load_s']:.2f} | "
                    f"{r['async_blocked_s']:.2f} | {r['async_publish_s']:.2f} ({r['async_steps']} steps) | "
                    f"{r['async_peak_extra_host_ratio']:.2f} |")
    size = f"{records[0]['params'] / 1e6:.1f}M params"
    return "\n".join([
        f"`python benchmarks/checkpoint.py{' --quick' if model == 'quick' else ''}`: DiffMoE DiT ({size}, "
        f"{' '.join(MODELS[model])}, 8 experts every 2nd block, ep_size min(W, 2)), ZeRO-2, fp32, gloo ranks "
        "on a 2-core machine shared with other jobs, files on local disk (page cache warm for loads). "
        "Each rank writes its own rank_RRRRR.safetensors; bytes from the manifest; host memory = RSS sampled "
        f"every 2 ms by a thread, minus RSS before the save. Async: ranks run {step_ms:.0f} ms busy steps "
        "and poll once per step until `latest` moves.", "", *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description="Checkpoint save/load benchmark on gloo ranks.")
    parser.add_argument("--quick", action="store_true", help="world 4 only, a ~13M-param model")
    parser.add_argument("--worlds", type=int, nargs="+", default=None, help="world sizes (default 1 2 4)")
    parser.add_argument("--step-ms", type=float, default=200.0, help="busy work per step during the async save")
    parser.add_argument("--no-results", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = parser.parse_args()
    model = "quick" if args.quick else "default"
    worlds = args.worlds or ([4] if args.quick else [1, 2, 4])
    records = []
    for world in worlds:
        records.append(run_world(world, model, args.step_ms))
        print(json.dumps(records[-1]), flush=True)
    if not args.no_results:
        update_results("checkpoint", report(records, model, args.step_ms))
    print(json.dumps({**records[-1], "model": model, "worlds": records}))


if __name__ == "__main__":
    main()
