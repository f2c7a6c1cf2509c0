"""Shared fixtures."""
from __future__ import annotations

import pytest

from tests.dist_utils import DistributedPool


@pytest.fixture(scope="module")
def pools():
    """`pools(world)`: a pool of `world` spawned gloo ranks, started once per test module."""
    made: dict[int, DistributedPool] = {}

    def get(world: int) -> DistributedPool:
        if world not in made:
            made[world] = DistributedPool(world)
        return made[world]

    yield get
    for pool in made.values():
        pool.close()
