"""benchmarks/checkpoint.py measures what it says: its pieces against independent references
(bytes per trained parameter, a known allocation), at world 2 on the quick model (~15 s)."""
from __future__ import annotations

import pytest

from benchmarks.checkpoint import PeakRSS, run_world


def test_peak_rss_sees_an_allocation():
    with PeakRSS() as rss:
        block = bytearray(b"\1") * (64 * 2**20)  # written pages: resident (still held when the block ends)
    del block
    assert 60 * 2**20 <= rss.extra < 80 * 2**20


@pytest.mark.slow
def test_world_2_record():
    r = run_world(2, "quick", step_ms=20)
    # fp32 master weight, two AdamW moments and the EMA: 16 bytes per trained parameter, plus buffers,
    # headers and RNG states (well under 1 MiB)
    assert 16 * r["params"] <= r["total_bytes"] <= 16 * r["params"] + 2**20
    assert r["busiest_rank_share"] <= 1.5 / 2
    assert r["peak_extra_host_ratio"] <= 1.5
    assert r["async_peak_extra_host_ratio"] >= 0.9  # the async host copy, about what the rank writes
    assert r["async_steps"] >= 1 and r["save_s"] > 0 and r["load_s"] > 0
