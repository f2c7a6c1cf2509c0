"""Byte accounting of the expert-parallel collectives (what `comm/*` in TensorBoard means).

Every count is the bytes *this rank sends* under the usual algorithm of each collective:

    all_to_all      the chunks addressed to other ranks (its own chunk is a local copy)
    all_gather      (n - 1) x its own chunk (ring)
    all_reduce      2 (n - 1) / n x the tensor (ring reduce-scatter + all-gather)

Counters are kept per MoE layer (one per pool and one per dispatcher) and drained by
`parallel.expert_parallel.comm_stats`.
"""
from __future__ import annotations

from collections import defaultdict

import torch


def all_reduce_bytes(t: torch.Tensor, group_size: int) -> float:
    return 2.0 * (group_size - 1) / group_size * t.numel() * t.element_size()


def all_gather_bytes(local: torch.Tensor, group_size: int) -> float:
    return float((group_size - 1) * local.numel() * local.element_size())


def all_to_all_bytes(t: torch.Tensor, send_rows: list[int], own_position: int) -> float:
    """`t` is the send buffer, split along dim 0 into `send_rows` chunks, one per group rank."""
    if t.shape[0] == 0:
        return 0.0
    row_bytes = t.element_size() * t.numel() // t.shape[0]
    return float((sum(send_rows) - send_rows[own_position]) * row_bytes)


class CommCounter:
    """Named byte counters of one layer's pool or dispatcher (forward and backward)."""

    def __init__(self) -> None:
        self.bytes: defaultdict[str, float] = defaultdict(float)

    def add(self, key: str, nbytes: float) -> None:
        self.bytes[key] += nbytes

    def drain(self) -> dict[str, float]:
        """Counts since the last drain; resets them."""
        out = dict(self.bytes)
        self.bytes.clear()
        return out
