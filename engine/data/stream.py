"""`data.order: stream` — webdataset's streaming pipeline, for datasets too large to index.

Each epoch the shard list is shuffled with a (train.seed, epoch) seed and split by rank, then by
data worker; each of the world_size x num_workers streams reads its shards through
`webdataset.WebDataset` and a shuffle buffer (data.shuffle_buffer) seeded by (seed, epoch, stream).
Stream w makes micro-batches w, w + K, w + 2K, ... of its rank (K = max(1, data.num_workers)), each
of the next micro_batch_size samples; the DataLoader hands them out round-robin.

Deterministic for a fixed world size and data.num_workers, and resumable: a resumed stream skips
the raw samples it had consumed (whole epochs arithmetically when index.json gives shard counts,
else by reading without decoding). NOT world-size invariant: another world size sees other
batches. Use `data.order: global` for that. A corrupt sample is replaced by a neighbour of the
same micro-batch, so batch boundaries, and hence resume positions, do not move.
"""
from __future__ import annotations

import itertools
import logging
import random
from typing import Any, Iterator

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from engine.data.decode import collate, decode_sample
from engine.data.order import draw_flips, micro_batch_indices
from engine.data.shards import CorruptSample, DataError
from engine.data.source import DataSource
from engine.rng import sample_seed

log = logging.getLogger(__name__)


class StreamBatches(IterableDataset):
    def __init__(self, source: DataSource, seed: int, rank: int, world_size: int, micro_batch_size: int,
                 grad_accum: int, num_workers: int, shuffle_buffer: int, random_flip: bool):
        self.paths, self.counts, self.spec = [str(p) for p in source.shard_paths], source.counts, source.spec
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.mb, self.grad_accum, self.streams = micro_batch_size, grad_accum, max(1, num_workers)
        self.shuffle_buffer, self.random_flip = shuffle_buffer, random_flip
        self.first_micro_batch = 0  # set by TrainLoader before each iteration
        self._read_errors = 0
        if len(self.paths) < world_size * self.streams:
            raise DataError(f"data.order=stream needs at least world size x data.num_workers = "
                            f"{world_size * self.streams} shards; {source.root} has {len(self.paths)}: "
                            "write smaller shards or use data.order=global")

    def epoch_shards(self, epoch: int, stream: int) -> list[int]:
        """Shards of one (rank, stream) in one epoch: the epoch's shuffled list split by rank, then stream."""
        shards = list(range(len(self.paths)))
        random.Random(sample_seed(self.seed, epoch, 0, "order")).shuffle(shards)
        return shards[self.rank :: self.world_size][stream :: self.streams]

    def _read_error(self, exn: Exception) -> bool:
        self._read_errors += 1
        log.warning("shard read error, continuing with the next shard: %s", exn)
        return True

    def raw_samples(self, stream: int, skip: int) -> Iterator[dict[str, Any]]:
        """The endless undecoded sample stream of one (rank, stream), after `skip` samples."""
        for epoch in itertools.count():
            shards = self.epoch_shards(epoch, stream)
            if self.counts is not None and skip >= (total := sum(self.counts[i] for i in shards)):
                if total == 0:
                    raise DataError(f"data.order=stream: the shards {[self.paths[i] for i in shards]} hold no sample")
                skip -= total
                continue
            pipeline = wds.WebDataset([self.paths[i] for i in shards], shardshuffle=False, nodesplitter=None,
                                      workersplitter=None, handler=self._read_error, empty_check=False)
            if self.shuffle_buffer > 1:
                pipeline = pipeline.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                            seed=sample_seed(self.seed, epoch, 1 + self.rank * self.streams + stream, "order"))
            seen = 0
            for raw in pipeline:
                seen += 1
                if skip:
                    skip -= 1
                    continue
                yield raw
            if seen == 0:
                raise DataError(f"data.order=stream: the shards {[self.paths[i] for i in shards]} hold no sample")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        m = self.first_micro_batch + (worker.id if worker else 0)
        stream = m % self.streams  # fixed per micro-batch number, whatever step we resume at
        raw = self.raw_samples(stream, skip=(m // self.streams) * self.mb)
        while True:
            step, accum = divmod(m, self.grad_accum)
            indices = micro_batch_indices(accum, self.rank, self.world_size, self.mb)
            flips = draw_flips(self.seed, step, indices, self.random_flip)
            decoded: list[dict[str, Any] | None] = []
            for sample, flip in zip([next(raw) for _ in range(self.mb)], flips):
                try:
                    decoded.append(decode_sample(sample, self.spec, flip))
                except CorruptSample as e:
                    log.warning("skipping corrupt sample (%s); its slot repeats a neighbour", e)
                    decoded.append(None)
            good = [d for d in decoded if d is not None]
            if not good:
                raise DataError(f"data.order=stream: every sample of micro-batch {m} is corrupt (see warnings)")
            skipped = len(decoded) - len(good) + self._read_errors
            self._read_errors = 0
            filled = [d if d is not None else _neighbour(decoded, i) for i, d in enumerate(decoded)]
            batch = collate(filled, step, indices, self.spec.text_length)
            batch["skipped"] = skipped
            yield batch
            m += self.streams


def _neighbour(decoded: list[dict[str, Any] | None], i: int) -> dict[str, Any]:
    """The nearest good sample before slot i, else after it."""
    order = itertools.chain(range(i - 1, -1, -1), range(i + 1, len(decoded)))
    return next(decoded[j] for j in order if decoded[j] is not None)
