"""The global sample order: which sample sits at each slot of each step's global batch.

Training position p = step * G + index (G the global batch size, index the slot in the step's
global batch). Epoch e = p // N is a permutation of the N samples seeded by (train.seed, e);
so the global batch of a step, and each sample's flip (drawn from its (seed, step, index)
generator), never depend on the number of ranks or data workers.
"""
from __future__ import annotations

import numpy as np
import torch

from engine.rng import sample_generator, sample_seed


def epoch_permutation(seed: int, epoch: int, num_samples: int) -> torch.Tensor:
    """Sample ids in the order of one epoch (a fresh, deterministic permutation per epoch)."""
    generator = torch.Generator().manual_seed(sample_seed(seed, epoch, 0, "order"))
    return torch.randperm(num_samples, generator=generator)


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
    """Sample id at a training position; keeps the permutations of the last two epochs used."""

    def __init__(self, seed: int, num_samples: int):
        self.seed, self.num_samples = seed, num_samples
        self._epochs: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._epochs:
            if len(self._epochs) >= 2:
                del self._epochs[min(self._epochs)]
            self._epochs[epoch] = epoch_permutation(self.seed, epoch, self.num_samples).numpy()
        return self._epochs[epoch]

    def sample_at(self, position: int, offset: int = 0) -> int:
        """Sample id at `position`, or `offset` places later in the same epoch (wrapping around it)."""
        epoch, within = divmod(position, self.num_samples)
        return int(self._permutation(epoch)[(within + offset) % self.num_samples])
