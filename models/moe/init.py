"""Deterministic initialisation of MoE parameters, independent of the global RNG and of the EP layout.

Every tensor of an MoE layer is drawn on the CPU from its own generator seeded by (block index,
what it is, expert id), then copied to the parameter's device. So expert `e` holds the same
weights whatever rank holds it, dense MoE parameters (router, predictor, shared experts) are equal
on every rank, and the global RNG stream that the DiT consumes does not depend on `ep_size`.
Parameters on the meta device are left alone (parameter counting builds models there).
"""
from __future__ import annotations

import hashlib
import math

import torch


def init_generator(block_index: int, name: str, expert: int = -1) -> torch.Generator:
    """CPU generator for one tensor group: (block, name, global expert id or -1 for dense)."""
    digest = hashlib.blake2b(f"moe/{block_index}/{name}/{expert}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def _fill(param: torch.Tensor, values: torch.Tensor) -> None:
    if param.is_meta:
        return
    with torch.no_grad():
        param.copy_(values.to(param.dtype))


def xavier_uniform(param: torch.Tensor, fan_in: int, fan_out: int, gen: torch.Generator) -> None:
    """Glorot-uniform (DiT's init of linear layers) for a [.., fan_in, fan_out]-shaped slice."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    _fill(param, torch.empty(param.shape).uniform_(-bound, bound, generator=gen))


def linear_default(param: torch.Tensor, fan_in: int, gen: torch.Generator) -> None:
    """torch.nn.Linear's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    _fill(param, torch.empty(param.shape).uniform_(-bound, bound, generator=gen))


def normal(param: torch.Tensor, std: float, gen: torch.Generator) -> None:
    _fill(param, torch.empty(param.shape).normal_(0.0, std, generator=gen))


def zeros(param: torch.Tensor) -> None:
    _fill(param, torch.zeros(param.shape))
