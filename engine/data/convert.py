"""The shard conversion runner shared by `make_shards imagenet` and `make_shards captions`.

Inputs are listed in a fixed sorted order; item n gets key `{n:09d}` and lands in shard n // size,
so the result does not depend on how the work is split. Ranks (RANK/WORLD_SIZE, or Slurm's
SLURM_PROCID/SLURM_NTASKS) take shards j with j % world == rank; within a rank, --workers processes
take whole shards. A shard is written under a temporary name and renamed when complete, so a rerun
redoes only missing shards. The rank that completes the last shard writes index.json.
"""
from __future__ import annotations

import io
import json
import logging
import multiprocessing as mp
import os
import queue
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from engine.data.decode import LATENT, TEXT_EMB, TEXT_POOLED
from engine.data.images import encode_image, load_rgb_crop
from engine.data.shards import (DataError, atomic_write_text, read_json, shard_done, shard_name, write_index,
                                write_shard)
from engine.data.text import TextEmbedder, text_meta
from engine.data.vae import LatentEncoder, latent_meta

PLAN_FILE = "convert.json"
log = logging.getLogger("engine.data.make_shards")


@dataclass(frozen=True)
class Item:
    """One input sample: its number in the sorted listing, image file and label or caption."""

    number: int
    path: str
    source: str  # path shown in messages and stored as provenance (relative to --src when possible)
    label: int = -1  # class index; -1: none
    caption: str | None = None
    caption_file: str | None = None  # read in the worker (folder form of captions)


@dataclass(frozen=True)
class EncodeSettings:
    """How every sample is made; picklable so each worker process builds its own encoders."""

    image_size: int
    image_format: str  # png | jpg
    store_image: bool
    vae: str  # "" none
    text_encoder: str  # "" none
    max_length: int
    batch_size: int
    device: str


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun/deepspeed or Slurm variables; (0, 1, 0) alone."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_NTASKS", 1)), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def resolve_device(device: str, local_rank: int) -> str:
    if device != "auto":
        return device
    return f"cuda:{local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class SampleEncoder:
    """Turns items into webdataset samples: centre crop, optional VAE latents (image and its flip),
    optional text embeddings. Unreadable inputs are reported by path and left out."""

    def __init__(self, settings: EncodeSettings, report: Callable[[int], Any]):
        self.settings, self.report = settings, report
        self.vae = LatentEncoder(settings.vae, settings.image_size, settings.device) if settings.vae else None
        self.text = TextEmbedder(settings.text_encoder, settings.device, settings.max_length) if settings.text_encoder else None

    def _load(self, item: Item) -> tuple[np.ndarray, str | None]:
        crop = load_rgb_crop(Path(item.path), self.settings.image_size)
        if item.caption_file is not None:
            return crop, Path(item.caption_file).read_text(encoding="utf-8").strip()
        return crop, item.caption

    def _latents(self, crops: list[np.ndarray], items: list[Item]) -> np.ndarray:
        """float16 [B, 2, C, h, w]: posterior samples of each crop and of its mirror image."""
        pixels = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        channels, side = self.vae.meta["channels"], self.vae.meta["size"]
        noise = torch.stack([torch.randn(2, channels, side, side,
                                         generator=torch.Generator().manual_seed(item.number)) for item in items])
        both = self.vae.encode(torch.cat([pixels, pixels.flip(-1)]), torch.cat([noise[:, 0], noise[:, 1]]))
        return torch.stack([both[: len(items)], both[len(items):]], dim=1).numpy().astype(np.float16)

    def samples(self, items: list[Item], skipped: list[dict]) -> Iterator[dict[str, Any]]:
        """Samples of `items` in order; appends {"path", "error"} to `skipped` for each one left out."""
        s = self.settings
        for first in range(0, len(items), s.batch_size):
            batch, crops, captions = [], [], []
            for item in items[first : first + s.batch_size]:
                try:
                    crop, caption = self._load(item)
                except Exception as e:  # any unreadable input is reported, never fatal
                    skipped.append({"path": item.source, "error": f"{type(e).__name__}: {e}"})
                    log.warning("skipping unreadable input %s (%s: %s)", item.source, type(e).__name__, e)
                    continue
                batch.append(item)
                crops.append(crop)
                captions.append(caption)
            latents = self._latents(crops, batch) if self.vae and batch else None
            texts = self.text.embed(captions) if self.text and batch else None
            for j, item in enumerate(batch):
                sample: dict[str, Any] = {"__key__": f"{item.number:09d}", "json": json.dumps({"source": item.source})}
                if s.store_image:
                    sample[s.image_format] = encode_image(crops[j], s.image_format)
                if latents is not None:
                    sample[LATENT] = _npy(latents[j])
                if item.label >= 0:
                    sample["cls"] = str(item.label)
                if captions[j] is not None:
                    sample["txt"] = captions[j]
                if texts is not None:
                    sample[TEXT_EMB], sample[TEXT_POOLED] = _npy(texts[j][0]), _npy(texts[j][1])
                yield sample
            self.report(len(items[first : first + s.batch_size]))

    def write(self, path: Path, items: list[Item]) -> int:
        skipped: list[dict] = []  # filled while write_shard consumes the samples, stored in the sidecar
        return write_shard(path, self.samples(items, skipped), extra={"skipped": skipped})


_worker_encoder: SampleEncoder | None = None


def _init_worker(settings: EncodeSettings, progress: Any, threads: int) -> None:
    global _worker_encoder
    torch.set_num_threads(threads)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("make_shards: %(message)s"))
    log.handlers[:], log.propagate = [handler], False
    _worker_encoder = SampleEncoder(settings, report=progress.put)


def _write_in_worker(path: Path, items: list[Item]) -> int:
    assert _worker_encoder is not None
    return _worker_encoder.write(path, items)


def describe(settings: EncodeSettings) -> dict:
    """index.json's record of what the samples hold (from the model configs; checks the folders early)."""
    s = settings
    return {"image": {"size": s.image_size, "channels": 3, "format": s.image_format} if s.store_image else None,
            "latent": latent_meta(s.vae, s.image_size) if s.vae else None,
            "text": text_meta(s.text_encoder, s.max_length) if s.text_encoder else None}


def _check_plan(out: Path, plan: dict) -> None:
    """A rerun must convert the same inputs the same way; otherwise finished shards would not fit."""
    path = out / PLAN_FILE
    if path.exists():
        old = read_json(path)
        changed = {k: (old.get(k), v) for k, v in plan.items() if old.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise DataError(f"{out} holds shards of a different conversion ({detail}); use another --out or empty it")
    else:
        atomic_write_text(path, json.dumps(plan, indent=1))


def convert(items: list[Item], out: Path, shard_size: int, settings: EncodeSettings, workers: int,
            meta: dict, listing_skipped: list[dict]) -> dict | None:
    """Write this rank's missing shards; returns index.json's content if this rank wrote it."""
    if shard_size < 1 or settings.image_size < 1:
        raise DataError(f"--shard-size and --image-size must be positive, got {shard_size} and {settings.image_size}")
    if not items:
        raise DataError("no input to convert")
    rank, world, local_rank = dist_env()
    settings = EncodeSettings(**{**asdict(settings), "device": resolve_device(settings.device, local_rank)})
    contents = describe(settings)
    out.mkdir(parents=True, exist_ok=True)
    plan = {**{k: v for k, v in asdict(settings).items() if k not in ("batch_size", "device")},
            "kind": meta["kind"], "shard_size": shard_size, "num_inputs": len(items)}
    _check_plan(out, plan)
    names = [shard_name(j) for j in range(-(-len(items) // shard_size))]
    jobs = [(out / names[j], items[j * shard_size : (j + 1) * shard_size])
            for j in range(rank, len(names), world) if not shard_done(out / names[j])]
    done_before = len(range(rank, len(names), world)) - len(jobs)
    if done_before:
        log.info("rank %d: %d shards already complete, %d to write", rank, done_before, len(jobs))
    progress = tqdm(total=sum(len(batch) for _, batch in jobs), unit="img", desc=f"{meta['kind']} shards",
                    disable=rank != 0, dynamic_ncols=True)
    if jobs and workers <= 1:
        encoder = SampleEncoder(settings, report=progress.update)
        for path, batch in jobs:
            encoder.write(path, batch)
    elif jobs:
        _run_pool(jobs, settings, workers, progress)
    progress.close()
    if not all(shard_done(out / n) for n in names):
        log.info("rank %d: finished its shards; index.json is written by the rank that finishes last", rank)
        return None
    return write_index(out, names, {**meta, **contents, "skipped": listing_skipped})


def _run_pool(jobs: list[tuple[Path, list[Item]]], settings: EncodeSettings, workers: int, progress: tqdm) -> None:
    context = mp.get_context("spawn")  # CUDA and fork do not mix
    reports = context.Queue()
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(settings, reports, threads)) as pool:
        pending = {pool.submit(_write_in_worker, path, batch) for path, batch in jobs}
        while pending:
            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for future in finished:
                future.result()  # a worker's error stops the run; finished shards stay
            while True:
                try:
                    progress.update(reports.get_nowait())
                except queue.Empty:
                    break
