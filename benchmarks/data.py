"""Throughput of the latent loader (samples/s per data worker and with K workers), and its memory
per worker at ImageNet's 1.28M and at 100M samples.

    python benchmarks/data.py [--samples 8192] [--workers 2] [--micro-batch 256] [--steps 24] [--sizes 1281167 100000000]

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

Memory at scale uses a synthetic index, not N samples on disk: index.json lists N / 1024 shards,
each a symbolic link to one of the real shards, and spans.bin repeats their spans. After the timed
steps (data.order=global, K workers) each worker's memory is read from /proc/PID/smaps_rollup:
private memory (pages only that worker holds: what one more worker costs; goal <= 100 MB at 100M)
and RSS (which also counts the pages it shares with the training process it was forked from).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
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
from engine.data.shards import INDEX_FILE, SPANS_FILE, shard_name, write_index, write_shard  # noqa: E402

GOAL = 5000
MEMORY_GOAL_MB = 100  # private memory per worker at 100M samples
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


def write_synthetic_index(root: Path, real: Path, num_samples: int) -> None:
    """A shard folder of `num_samples` samples without their bytes: shard j links to real shard j % R."""
    index = json.loads((real / INDEX_FILE).read_text())
    real_names = [s["name"] for s in index["shards"]]
    real_spans = np.fromfile(real / SPANS_FILE, dtype="<i8").reshape(len(real_names), SHARD_SIZE, 2)
    counts = [SHARD_SIZE] * (num_samples // SHARD_SIZE) + ([num_samples % SHARD_SIZE] if num_samples % SHARD_SIZE else [])
    with open(root / SPANS_FILE, "wb") as spans:
        for j, count in enumerate(counts):
            (root / shard_name(j)).symlink_to(real / real_names[j % len(real_names)])
            spans.write(real_spans[j % len(real_names), :count].tobytes())
    index.update(num_samples=num_samples, shards=[{"name": shard_name(j), "count": c} for j, c in enumerate(counts)])
    (root / INDEX_FILE).write_text(json.dumps(index))


def process_memory_mb(pid: int | str) -> tuple[float, float]:
    """(RSS, private memory) of a process in MB, from /proc/PID/smaps_rollup."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    kb = {k: int(v.split()[0]) for k, v in fields.items()}
    return kb["Rss"] / 1024, (kb["Private_Clean"] + kb["Private_Dirty"]) / 1024


def worker_pids() -> list[str]:
    return [pid for task in Path("/proc/self/task").iterdir() for pid in (task / "children").read_text().split()]


def tree_cpu_seconds() -> float:
    """CPU time of this process and its live children (the DataLoader workers), from /proc."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in worker_pids():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def measure(root: Path, order: str, workers: int, micro_batch: int, steps: int) -> dict:
    """Samples per wall-clock second and per CPU-second of the process tree; then the memory (MB) of
    the training process and of its largest worker."""
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
    wall, per_cpu = samples / (time.perf_counter() - start), samples / (tree_cpu_seconds() - cpu)
    main_rss, main_private = process_memory_mb("self")
    workers_mb = [process_memory_mb(pid) for pid in worker_pids()]
    return {"wall": wall, "per_cpu": per_cpu, "main_rss": main_rss, "main_private": main_private,
            "worker_rss": max((m[0] for m in workers_mb), default=0.0),
            "worker_private": max((m[1] for m in workers_mb), default=0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1_281_167, 100_000_000],
                        help="dataset sizes of the memory measurement (synthetic index)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, memory = [], []
    with tempfile.TemporaryDirectory(prefix="data_bench_") as tmp:
        real = Path(tmp) / "real"
        real.mkdir()
        write_latent_shards(real, args.samples)
        for order in ("global", "stream"):
            for workers in (0, 1, args.workers):
                row = {"order": order, "workers": workers, **measure(real, order, workers, args.micro_batch, args.steps)}
                rows.append(row)
                print(f"order={order:6s} workers={workers}: {row['wall']:7.0f} samples/s wall clock, "
                      f"{row['per_cpu']:7.0f} per CPU-second", file=sys.stderr)
        for size in [args.samples, *args.sizes]:
            root = real
            if size != args.samples:
                root = Path(tmp) / f"n{size}"
                root.mkdir()
                write_synthetic_index(root, real, size)
            row = {"samples": size, **measure(root, "global", args.workers, args.micro_batch, args.steps)}
            memory.append(row)
            print(f"{size:>11} samples, {args.workers} workers: worker private {row['worker_private']:.1f} MB, "
                  f"RSS {row['worker_rss']:.1f} MB; training process RSS {row['main_rss']:.1f} MB; "
                  f"{row['per_cpu']:.0f} samples per CPU-second", file=sys.stderr)
            if root != real:
                shutil.rmtree(root)
    one = next(r for r in rows if r["order"] == "global" and r["workers"] == 1)
    k = next(r for r in rows if r["order"] == "global" and r["workers"] == args.workers)
    table = ["| data.order | data.num_workers | samples/s (wall clock) | samples per CPU-second |", "|---|---|---|---|"]
    table += [f"| {r['order']} | {r['workers'] or '0 (training process)'} | {r['wall']:.0f} | {r['per_cpu']:.0f} |"
              for r in rows]
    largest = memory[-1]
    mem_table = ["| samples | worker private MB | worker RSS MB | training process RSS MB | training process private MB "
                 "| samples per CPU-second | samples/s (wall clock) |", "|---|---|---|---|---|---|---|"]
    mem_table += [f"| {r['samples']:,} | {r['worker_private']:.1f} | {r['worker_rss']:.1f} | {r['main_rss']:.1f} "
                  f"| {r['main_private']:.1f} | {r['per_cpu']:.0f} | {r['wall']:.0f} |" for r in memory]
    update_results("data", "\n".join([
        f"Latent loader on synthetic ImageNet-256 latents ({args.samples} samples of 16 KiB in shards of "
        f"{SHARD_SIZE}, micro-batch {args.micro_batch}, random flips). Goal: >= {GOAL} samples/s per worker. "
        f"Machine: {os.cpu_count()} cores shared with other jobs, so wall-clock rates understate the loader; "
        "samples per CPU-second (training process + workers) is what one dedicated core per worker delivers.",
        "", *table, "",
        f"One worker (data.order=global): **{one['per_cpu']:.0f} samples per CPU-second** "
        f"({'meets' if one['per_cpu'] >= GOAL else 'misses'} the goal), {one['wall']:.0f} samples/s wall clock; "
        f"{args.workers} workers: {k['wall']:.0f} samples/s wall clock.",
        "",
        f"Memory at scale (data.order=global, {args.workers} workers, {args.steps} steps of {args.micro_batch}; "
        f"synthetic index: shards of {SHARD_SIZE} linked to the {args.samples} real samples, no sample written "
        "twice). Private: pages only the worker holds, what each extra worker costs "
        f"(goal <= {MEMORY_GOAL_MB} MB at 100M). RSS also counts pages shared with the training process "
        "it was forked from (torch, Python).",
        "", *mem_table, "",
        f"At {largest['samples']:,} samples: **{largest['worker_private']:.1f} MB private per worker** "
        f"({'meets' if largest['worker_private'] <= MEMORY_GOAL_MB else 'misses'} the goal), "
        f"RSS {largest['worker_rss']:.1f} MB.",
    ]))
    print(json.dumps({"latent_samples_per_cpu_s_per_worker": round(one["per_cpu"]),
                      "latent_samples_per_s_1_worker_wall": round(one["wall"]), "workers": args.workers,
                      "latent_samples_per_s_k_workers_wall": round(k["wall"]), "goal_per_worker": GOAL,
                      "meets_goal": one["per_cpu"] >= GOAL,
                      "worker_private_mb": {str(r["samples"]): round(r["worker_private"], 1) for r in memory},
                      "worker_rss_mb": {str(r["samples"]): round(r["worker_rss"], 1) for r in memory},
                      "memory_goal_mb": MEMORY_GOAL_MB,
                      "meets_memory_goal": largest["worker_private"] <= MEMORY_GOAL_MB}))


if __name__ == "__main__":
    main()
