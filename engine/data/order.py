"""The global sample order: which sample sits at each slot of each step's global batch.

Training position p = step * G + index (G the global batch size, index the slot in the step's
global batch). Epoch e = p // N is a permutation of the N samples keyed by (train.seed, e); so the
global batch of a step, and each sample's flip (drawn from its (seed, step, index) generator),
never depend on the number of ranks or data workers.

The permutation is computed, not stored: a keyed Feistel network permutes the k-bit integers
[0, 2^k) (k = bits of N - 1, at least 2), and cycle walking (apply it again while the result is
>= N) restricts it to [0, N). Memory is O(1) in N: 100M samples cost what 100 do. The domain is
under 2N, so a position takes fewer than two walks on average.
"""
from __future__ import annotations

import numpy as np
import torch

from engine.rng import sample_generator, sample_seed

# 4 rounds make a pseudo-random permutation of a large domain; tiny ones (N < 16, 1-2 bit halves) need ~10
# before the samples drawn for two slots of an epoch show no bias (tests/test_data_scale.py)
FEISTEL_ROUNDS = 10
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # splitmix64's finaliser


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's bijective 64-bit finaliser (uint64 arithmetic wraps around)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


class EpochPermutation:
    """A keyed bijection of [0, num_samples): `perm(ids)` maps an array of positions to sample ids."""

    def __init__(self, key: int, num_samples: int):
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples = num_samples
        bits = max(2, (num_samples - 1).bit_length())
        self._left_bits, self._right_bits = bits // 2, bits - bits // 2
        keys = np.array([key], dtype=np.uint64) + np.arange(1, FEISTEL_ROUNDS + 1, dtype=np.uint64)
        self._round_keys = _mix(keys * np.uint64(0x9E3779B97F4A7C15))

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        """One pass of the Feistel network over [0, 2^k); the two halves swap widths every round."""
        left_bits, right_bits = self._left_bits, self._right_bits
        left, right = x >> np.uint64(right_bits), x & np.uint64((1 << right_bits) - 1)
        for key in self._round_keys:
            mask = np.uint64((1 << left_bits) - 1)
            left, right = right, left ^ (_mix(right ^ key) & mask)
            left_bits, right_bits = right_bits, left_bits
        return (left << np.uint64(right_bits)) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        y = self._encrypt(np.asarray(positions, dtype=np.uint64))
        outside = y >= self.num_samples
        while outside.any():  # cycle walking: ends because the start point lies inside [0, N)
            y[outside] = self._encrypt(y[outside])
            outside = y >= self.num_samples
        return y.astype(np.int64)


def micro_batch_indices(accum: int, rank: int, world_size: int, micro_batch_size: int) -> torch.Tensor:
    """Slots in the step's global batch of one rank's accumulation micro-batch."""
    first = (accum * world_size + rank) * micro_batch_size
    return torch.arange(first, first + micro_batch_size)


def draw_flips(seed: int, step: int, indices: torch.Tensor, enabled: bool) -> list[bool]:
    """Horizontal flip of each slot, from its own (seed, step, index) generator."""
    if not enabled:
        return [False] * len(indices)
    return [bool(torch.rand((), generator=sample_generator(seed, step, int(i), "flip")) < 0.5) for i in indices]


class GlobalOrder:
    """Sample id at a training position: epoch e's permutation is keyed by (seed, e)."""

    def __init__(self, seed: int, num_samples: int):
        self.seed, self.num_samples = seed, num_samples
        self._epoch, self._permutation = -1, EpochPermutation(0, num_samples)

    def permutation(self, epoch: int) -> EpochPermutation:
        if epoch != self._epoch:  # a key schedule, a few hundred bytes: rebuilt when the epoch changes
            self._epoch = epoch
            self._permutation = EpochPermutation(sample_seed(self.seed, epoch, 0, "order"), self.num_samples)
        return self._permutation

    def samples_at(self, positions: np.ndarray) -> np.ndarray:
        """Sample ids at an array of training positions (any epochs)."""
        positions = np.asarray(positions, dtype=np.int64)
        epochs, within = np.divmod(positions, self.num_samples)
        ids = np.empty_like(positions)
        for epoch in np.unique(epochs).tolist():
            chosen = epochs == epoch
            ids[chosen] = self.permutation(epoch)(within[chosen])
        return ids

    def sample_at(self, position: int, offset: int = 0) -> int:
        """Sample id at `position`, or `offset` places later in the same epoch (wrapping around it)."""
        epoch, within = divmod(position, self.num_samples)
        return int(self.permutation(epoch)(np.array([(within + offset) % self.num_samples]))[0])
