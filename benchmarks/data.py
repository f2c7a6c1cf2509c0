"""Throughput of the latent loader: samples/s per data worker and with K workers.

    python benchmarks/data.py [--samples 8192] [--workers 2] [--micro-batch 256] [--steps 24]

Writes synthetic ImageNet-256 latent shards (float16 [2, 4, 32, 32] latents of image and flip
plus a class, 16 KiB a sample, as `make_shards imagenet --vae` writes them) to a temporary folder
and times `build_train_loader` over them: data.order=global (random access, the default) and
data.order=stream, in the training process and with 1 and K DataLoader workers. Goal: >= 5,000
samples/s per worker, so the loader is never what a GPU waits for. The page cache holds the
shards, so this measures the loader's own cost (parse, decode, flip, collate, worker transfer),
not the file system's.

Two rates per setting: wall clock, and per CPU-second of the whole process tree (training process
plus its workers) — what one dedicated core per worker delivers. On a shared machine the wall
clock mostly measures the neighbours; the per-CPU-second rate is the headline.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import update_results  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.data import build_train_loader  # noqa: E402
from engine.data.shards import shard_name, write_index, write_shard  # noqa: E402

GOAL = 5000
SHARD_SIZE = 1024


def write_latent_shards(root: Path, num_samples: int) -> None:
    rng = np.random.default_rng(0)

    def sample(i: int) -> dict:
        buffer = io.BytesIO()
        np.save(buffer, rng.standard_normal((2, 4, 32, 32)).astype(np.float16))
        return {"__key__": f"{i:09d}", "latent.npy": buffer.getvalue(), "cls": str(i % 1000)}

    names = []
    for number, first in enumerate(range(0, num_samples, SHARD_SIZE)):
        names.append(shard_name(number))
        write_shard(root / names[-1], (sample(i) for i in range(first, min(num_samples, first + SHARD_SIZE))))
    write_index(root, names, {"kind": "imagenet", "num_classes": 1000})


def tree_cpu_seconds() -> float:
    """CPU time of this process and its live children (the DataLoader workers), from /proc."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path("/proc/self/task").iterdir():
        for pid in (task / "children").read_text().split():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def samples_per_second(root: Path, order: str, workers: int, micro_batch: int, steps: int) -> tuple[float, float]:
    """(samples per wall-clock second, samples per CPU-second of the process tree)."""
    cfg = load_config(None, ["data.source=imagenet", f"data.shards={root}", "data.latent=true", "data.random_flip=true",
                             f"data.order={order}", f"data.num_workers={workers}", "model.in_channels=4",
                             "model.input_size=32", f"train.global_batch_size={micro_batch}"])
    iterator = iter(build_train_loader(cfg, 0, 1, micro_batch, 1, 0))
    for _ in range(2 * max(1, workers)):  # worker start-up and prefetch are not throughput
        next(iterator)
    start, cpu = time.perf_counter(), tree_cpu_seconds()
    for _ in range(steps):
        next(iterator)
    samples = steps * micro_batch
    return samples / (time.perf_counter() - start), samples / (tree_cpu_seconds() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="data_bench_") as tmp:
        write_latent_shards(Path(tmp), args.samples)
        for order in ("global", "stream"):
            for workers in (0, 1, args.workers):
                wall, per_cpu = samples_per_second(Path(tmp), order, workers, args.micro_batch, args.steps)
                rows.append({"order": order, "workers": workers, "wall": wall, "per_cpu": per_cpu})
                print(f"order={order:6s} workers={workers}: {wall:7.0f} samples/s wall clock, "
                      f"{per_cpu:7.0f} per CPU-second", file=sys.stderr)
    one = next(r for r in rows if r["order"] == "global" and r["workers"] == 1)
    k = next(r for r in rows if r["order"] == "global" and r["workers"] == args.workers)
    table = ["| data.order | data.num_workers | samples/s (wall clock) | samples per CPU-second |", "|---|---|---|---|"]
    table += [f"| {r['order']} | {r['workers'] or '0 (training process)'} | {r['wall']:.0f} | {r['per_cpu']:.0f} |"
              for r in rows]
    update_results("data", "\n".join([
        f"Latent loader on synthetic ImageNet-256 latents ({args.samples} samples of 16 KiB in shards of "
        f"{SHARD_SIZE}, micro-batch {args.micro_batch}, random flips). Goal: >= {GOAL} samples/s per worker. "
        f"Machine: {os.cpu_count()} cores shared with other jobs, so wall-clock rates understate the loader; "
        "samples per CPU-second (training process + workers) is what one dedicated core per worker delivers.",
        "", *table, "",
        f"One worker (data.order=global): **{one['per_cpu']:.0f} samples per CPU-second** "
        f"({'meets' if one['per_cpu'] >= GOAL else 'misses'} the goal), {one['wall']:.0f} samples/s wall clock; "
        f"{args.workers} workers: {k['wall']:.0f} samples/s wall clock.",
    ]))
    print(json.dumps({"latent_samples_per_cpu_s_per_worker": round(one["per_cpu"]),
                      "latent_samples_per_s_1_worker_wall": round(one["wall"]), "workers": args.workers,
                      "latent_samples_per_s_k_workers_wall": round(k["wall"]), "goal_per_worker": GOAL,
                      "meets_goal": one["per_cpu"] >= GOAL}))


if __name__ == "__main__":
    main()
