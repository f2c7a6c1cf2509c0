"""The training loader: per step, this rank's `grad_accum` micro-batches of the step's global batch.

    loader = build_train_loader(cfg, rank, world_size, micro_batch_size, grad_accum, start_step)
    for micro_batches in loader:          # one list per step, len == grad_accum
        for batch in micro_batches:       # x [mb,C,H,W], y [mb], index [mb], step, key, ...
            ...
    state = loader.state_dict(all_reduce_sum, device)  # collective; into the checkpoint
    loader.load_state_dict(state)                       # resumes (any world size)

`data.order: global` (default) reads indexed shards by random access in the world-size-invariant
global order of `engine.data.order`; each DataLoader worker builds whole micro-batches, so the
result does not depend on data.num_workers either. `data.order: stream` is webdataset's streaming
pipeline (see `engine.data.stream`).
"""
from __future__ import annotations

import gc
import itertools
import logging
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from engine.data.decode import collate, decode_sample
from engine.data.order import GlobalOrder, draw_flips, micro_batch_indices
from engine.data.shards import CorruptSample, DataError, ShardReader
from engine.data.source import DataSource, open_source
from engine.data.stream import StreamBatches

if TYPE_CHECKING:
    from engine.config import Config

MAX_REPLACEMENTS = 64  # consecutive corrupt samples of the epoch order before giving up
log = logging.getLogger(__name__)


class GlobalOrderBatches(Dataset):
    """Item m = this rank's micro-batch number m (step = m // grad_accum, accum = m % grad_accum).

    A corrupt sample is replaced by the next sample of the epoch order (the same on every rank and
    world size), counted in the batch's `skipped`, and named in a warning once per worker.
    """

    def __init__(self, source: DataSource, seed: int, rank: int, world_size: int,
                 micro_batch_size: int, grad_accum: int, random_flip: bool):
        assert source.index is not None
        self.spec, self.seed, self.random_flip = source.spec, seed, random_flip
        self.rank, self.world_size, self.mb, self.grad_accum = rank, world_size, micro_batch_size, grad_accum
        self.global_batch = micro_batch_size * world_size * grad_accum
        self.reader = ShardReader(source.index)
        self.order = GlobalOrder(seed, source.index.num_samples)
        self._warned: set[int] = set()

    def __getitem__(self, m: int) -> dict[str, Any]:
        step, accum = divmod(m, self.grad_accum)
        indices = micro_batch_indices(accum, self.rank, self.world_size, self.mb)
        samples, skipped = [], 0
        positions = step * self.global_batch + indices.numpy()
        first_choice = self.order.samples_at(positions)
        for position, first, flip in zip(positions.tolist(), first_choice.tolist(),
                                          draw_flips(self.seed, step, indices, self.random_flip)):
            for offset in range(MAX_REPLACEMENTS):
                sample_id = self.order.sample_at(position, offset) if offset else first
                try:
                    samples.append(decode_sample(self.reader.read(sample_id), self.spec, flip))
                    break
                except CorruptSample as e:
                    skipped += 1
                    if sample_id not in self._warned:
                        self._warned.add(sample_id)
                        log.warning("skipping corrupt sample (%s); using the next sample of the epoch order", e)
            else:
                raise DataError(f"{MAX_REPLACEMENTS} corrupt samples in a row at training position {position} "
                                f"in {self.reader.index.root}: the shards look damaged, rebuild them")
        batch = collate(samples, step, indices, self.spec.text_length)
        batch["skipped"] = skipped
        return batch


class _CountFrom(Sampler[int]):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)  # decoding is per sample; threads would only fight the trainer's


class TrainLoader:
    """Endless iterable of steps (lists of `grad_accum` micro-batch dicts) from the current position."""

    def __init__(self, dataset: GlobalOrderBatches | StreamBatches, *, order: str, num_workers: int,
                 grad_accum: int, start_step: int, global_batch_size: int, num_samples: int | None, seed: int,
                 rank: int, world_size: int):
        self.dataset, self.order, self.num_workers, self.grad_accum = dataset, order, num_workers, grad_accum
        self.rank, self.world_size = rank, world_size
        self.global_batch_size, self.num_samples, self.seed = global_batch_size, num_samples, seed
        self._next_step = start_step
        self._skipped = 0

    @property
    def skipped_samples(self) -> int:
        """Corrupt or incomplete samples skipped so far by this rank (in the steps handed out)."""
        return self._skipped

    def epoch(self, step: int | None = None) -> float | None:
        """Epochs of data in the first `step` steps (default: the steps handed out); None if N is unknown."""
        step = self._next_step if step is None else step
        return step * self.global_batch_size / self.num_samples if self.num_samples else None

    def _dataloader(self) -> DataLoader:
        first = self._next_step * self.grad_accum
        common: dict[str, Any] = dict(batch_size=None, num_workers=self.num_workers,
                                      pin_memory=torch.cuda.is_available(), worker_init_fn=_init_worker)
        if self.num_workers:
            common["prefetch_factor"] = 2
        if isinstance(self.dataset, IterableDataset):
            self.dataset.first_micro_batch = first
            return DataLoader(self.dataset, **common)
        return DataLoader(self.dataset, sampler=_CountFrom(first), **common)

    def _batches(self) -> Iterator[dict[str, Any]]:
        """The DataLoader's iterator. Its workers are forked with the training process's objects frozen
        (gc.freeze): a worker's garbage collector then never writes to them, so the pages it shares
        with the training process stay shared instead of being copied into every worker."""
        loader = self._dataloader()
        if not self.num_workers:
            return iter(loader)
        gc.collect()
        gc.freeze()
        try:
            return iter(loader)  # forks the workers
        finally:
            gc.unfreeze()

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        group: list[dict[str, Any]] = []
        for batch in self._batches():
            group.append(batch)
            if len(group) == self.grad_accum:
                self._skipped += sum(b.pop("skipped") for b in group)
                self._next_step = group[0]["step"] + 1
                yield group
                group = []

    def state_dict(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   device: torch.device | str = "cpu") -> dict[str, Any]:
        """The position, and every rank's skip counter (`skipped_per_rank`, gathered by one
        `all_reduce_sum` over a world-size vector, so every rank must call it; `skipped`: their sum).
        Without `all_reduce_sum` only a single process's state is complete."""
        if all_reduce_sum is None and self.world_size > 1:
            raise ValueError("state_dict at world size > 1 needs all_reduce_sum to gather every rank's skip counter")
        counts = torch.zeros(self.world_size, dtype=torch.int64, device=device)
        counts[self.rank] = self._skipped
        per_rank = (all_reduce_sum(counts) if all_reduce_sum is not None else counts).tolist()
        return {"order": self.order, "step": self._next_step, "global_batch_size": self.global_batch_size,
                "num_samples": self.num_samples, "seed": self.seed, "skipped": sum(per_rank),
                "skipped_per_rank": per_rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved step; warns when the saved order cannot continue exactly.

        Each rank takes back its own skip counter. Saved at another world size (or by a version that
        kept one counter), rank 0 takes the total and the others start at 0: the sum over ranks, which
        is what is logged, continues exactly."""
        for key in ("order", "global_batch_size", "num_samples", "seed"):
            if state.get(key) != getattr(self, key):
                log.warning("data position saved with %s=%s, now %s: continuing at step %d in the new order",
                            key, state.get(key), getattr(self, key), state["step"])
        self._next_step = int(state["step"])
        per_rank = state.get("skipped_per_rank")
        if per_rank is not None and len(per_rank) == self.world_size:
            self._skipped = int(per_rank[self.rank])
        else:
            self._skipped = int(state.get("skipped", 0)) if self.rank == 0 else 0


def build_train_loader(cfg: Config, rank: int, world_size: int, micro_batch_size: int, grad_accum: int,
                       start_step: int = 0) -> TrainLoader:
    """The loader of data-parallel rank `rank`; `start_step` = steps already trained (0 fresh)."""
    global_batch = micro_batch_size * world_size * grad_accum
    if global_batch != cfg.train.global_batch_size:
        raise DataError(f"train.global_batch_size={cfg.train.global_batch_size} but micro batch {micro_batch_size} "
                        f"x world {world_size} x accumulation {grad_accum} = {global_batch}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    source = open_source(cfg)
    seed, data = cfg.train.seed, cfg.data
    if data.order == "global":
        dataset: GlobalOrderBatches | StreamBatches = GlobalOrderBatches(
            source, seed, rank, world_size, micro_batch_size, grad_accum, data.random_flip)
    else:
        dataset = StreamBatches(source, seed, rank, world_size, micro_batch_size, grad_accum,
                                data.num_workers, data.shuffle_buffer, data.random_flip)
    return TrainLoader(dataset, order=data.order, num_workers=data.num_workers, grad_accum=grad_accum,
                       start_step=start_step, global_batch_size=global_batch, num_samples=source.num_samples,
                       seed=seed, rank=rank, world_size=world_size)
