"""Randomness addressed by global sample index, so a step's draws do not depend on the world size.

Every random quantity of a training sample (noise, timestep, label dropout, flip) comes from a
generator seeded by (seed, step, index, stream): rank r drawing sample i of step s gets exactly
what a single process drawing the whole global batch gets.
"""
from __future__ import annotations

import hashlib

import torch

_STREAMS = ("noise", "time", "label_drop", "flip", "sample", "order")


def sample_seed(seed: int, step: int, index: int, stream: str) -> int:
    """A 63-bit seed for one (seed, step, global sample index, stream) tuple."""
    if stream not in _STREAMS:
        raise ValueError(f"unknown random stream {stream!r} (known: {', '.join(_STREAMS)})")
    digest = hashlib.blake2b(f"{seed}/{step}/{index}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_generator(seed: int, step: int, index: int, stream: str) -> torch.Generator:
    """A CPU generator for one sample's draws (CPU so values are identical on every device)."""
    return torch.Generator().manual_seed(sample_seed(seed, step, index, stream))


def per_sample_normal(seed: int, step: int, indices: torch.Tensor, shape: tuple[int, ...], stream: str = "noise") -> torch.Tensor:
    """[len(indices), *shape] standard normals, row i drawn from sample indices[i]'s generator."""
    return torch.stack([torch.randn(shape, generator=sample_generator(seed, step, int(i), stream)) for i in indices])


def per_sample_uniform(seed: int, step: int, indices: torch.Tensor, stream: str) -> torch.Tensor:
    """[len(indices)] uniforms in [0, 1), one per sample index."""
    return torch.cat([torch.rand(1, generator=sample_generator(seed, step, int(i), stream)) for i in indices])
