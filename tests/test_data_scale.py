"""Data at 100M samples: the computed epoch order, O(shards) span lookup with a bounded sidecar cache,
and every rank's skip counter surviving a checkpoint (2 real gloo ranks, and a real 2-rank training run)."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import engine.data.shards as shards_module
from engine.data import DataError, build_train_loader
from engine.data.order import EpochPermutation, GlobalOrder
from engine.data.shards import INDEX_FILE, SPANS_FILE, ShardIndex, ShardReader, shard_name
from parallel.expert_parallel import all_reduce_sum
from tests.test_data import _corrupt_member, latent_cfg, sample_of, write_latent_shards


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 48, 1000, 1023, 1024, 1025, 65537])
def test_epoch_permutation_is_a_bijection_of_0_to_n(n: int) -> None:
    ids = EpochPermutation(key=12345, num_samples=n)(np.arange(n))
    assert sorted(ids.tolist()) == list(range(n))
    if n >= 8:  # keyed: another key (another epoch or seed) gives another order, and neither is the identity
        other = EpochPermutation(key=12346, num_samples=n)(np.arange(n))
        assert not np.array_equal(ids, other) and not np.array_equal(ids, np.arange(n))


def test_order_costs_no_memory_proportional_to_the_dataset() -> None:
    # 10^12 samples: a stored permutation would need 8 TB; the computed one answers at once
    order, n = GlobalOrder(seed=3, num_samples=10**12), 10**12
    positions = np.arange(5 * n - 5000, 5 * n + 5000)  # the end of epoch 4 and the start of epoch 5
    ids = order.samples_at(positions)
    assert ids.min() >= 0 and ids.max() < n
    assert len(set(ids[:5000].tolist())) == 5000 and len(set(ids[5000:].tolist())) == 5000  # injective per epoch
    assert [order.sample_at(int(p)) for p in positions[4990:5010]] == ids[4990:5010].tolist()
    assert order.sample_at(int(positions[0]), offset=7) == int(ids[7])  # later in the same epoch


def test_order_is_statistically_uniform() -> None:
    """Over many epochs every sample lands in slot 0 equally often, and ordered pairs in slots (0, 1)
    too (chi-square, 4 and 19 degrees of freedom; the thresholds are the 0.999 quantiles). Deterministic."""
    n, epochs = 5, 4000
    order = GlobalOrder(seed=11, num_samples=n)
    first_two = np.array([order.samples_at(np.array([e * n, e * n + 1])) for e in range(epochs)])
    singles = np.bincount(first_two[:, 0], minlength=n)
    chi_single = float(((singles - epochs / n) ** 2 / (epochs / n)).sum())
    pairs = np.bincount(first_two[:, 0] * n + first_two[:, 1], minlength=n * n).reshape(n, n)
    assert np.all(np.diag(pairs) == 0)
    expected = epochs / (n * (n - 1))
    chi_pairs = float(((pairs[~np.eye(n, dtype=bool)] - expected) ** 2 / expected).sum())
    assert chi_single < 18.47 and chi_pairs < 43.82, (singles, pairs)
    # a large epoch: positions and ids are uncorrelated (no shift or stride pattern)
    ids = GlobalOrder(seed=11, num_samples=10**6).samples_at(np.arange(100_000))
    assert abs(np.corrcoef(np.arange(100_000), ids)[0, 1]) < 0.02
    assert abs(np.corrcoef(ids[:-1], ids[1:])[0, 1]) < 0.02


def _drop_spans_file(root: Path) -> None:
    """Make `root` look like a folder indexed before spans.bin existed (sidecars only)."""
    index = json.loads((root / INDEX_FILE).read_text())
    del index["spans"]
    (root / INDEX_FILE).write_text(json.dumps(index))
    (root / SPANS_FILE).unlink()


def test_spans_file_and_bounded_sidecar_cache_read_the_same_samples(tmp_path: Path, monkeypatch) -> None:
    new = write_latent_shards(tmp_path / "new", (10, 10, 10, 10, 8))
    assert (new / SPANS_FILE).stat().st_size == 16 * 48
    old = tmp_path / "old"
    shutil.copytree(new, old)
    _drop_spans_file(old)
    monkeypatch.setattr(shards_module, "SIDECAR_CACHE_SPANS", 25)  # room for two shards of 10
    fast, fallback = ShardReader(ShardIndex(new)), ShardReader(ShardIndex(old))
    cached = []
    for sample_id in np.random.default_rng(0).permutation(48).tolist() * 2:
        a, b = fast.read(sample_id), fallback.read(sample_id)
        assert a == b and sample_of(torch.from_numpy(np.load(io.BytesIO(a["latent.npy"]))))[0] == sample_id
        cached.append((len(fallback.index._sidecars), fallback.index._sidecar_spans))
    assert fast.index._sidecars == {}  # spans.bin needs no per-shard cache
    # bounded: at most the bound, plus the shard just read; every shard was visited, only 2-3 stay
    assert max(n for n, _ in cached) <= 3 and max(s for _, s in cached) <= 25 + 10
    fast.close()
    fallback.close()


def test_a_damaged_spans_file_is_named(tmp_path: Path) -> None:
    root = write_latent_shards(tmp_path / "s", (4, 4))
    with open(root / SPANS_FILE, "r+b") as f:
        f.truncate(16 * 7)
    with pytest.raises(DataError, match=f"{SPANS_FILE}.*make_shards index"):
        ShardIndex(root)


# ------------------------------------------------------------------------------------------------
# per-rank skip counters

STEPS, MORE = 3, 2  # steps before the checkpoint, steps after the resume


def _damage_rank1_slots(root: Path, steps: int) -> list[int]:
    """Corrupt the first-choice samples of rank 1's slots (world 2, global batch 8) in steps 0..steps-1,
    two per step, so rank 1 skips samples and rank 0 (almost) none. Returns the corrupt ids."""
    order = GlobalOrder(3, 48)
    ids = sorted({int(order.sample_at(s * 8 + slot)) for s in range(steps) for slot in (4, 6)})
    for i in ids:
        _corrupt_member(root, shard_name(i // 10), f"{i:05d}", "latent.npy")
    return ids


def _skips_across_a_checkpoint(root: str, state_file: str) -> dict:
    """On each of 2 gloo ranks: STEPS steps, save the loader state as the checkpoint does (rank 0 writes
    the gathered state), resume in a new loader from the file, MORE steps."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    cfg = latent_cfg(Path(root), 8)
    loader = build_train_loader(cfg, rank, world, 4, 1, 0)
    for _ in zip(range(STEPS), loader):
        pass
    before = loader.skipped_samples
    state = loader.state_dict(all_reduce_sum)  # collective
    if rank == 0:
        Path(state_file).write_text(json.dumps(state))
    torch.distributed.barrier()
    resumed = build_train_loader(cfg, rank, world, 4, 1, STEPS)
    resumed.load_state_dict(json.loads(Path(state_file).read_text()))
    restored = resumed.skipped_samples
    for _ in zip(range(MORE), resumed):
        pass
    return {"before": before, "restored": restored, "after": resumed.skipped_samples, "state": state}


@pytest.mark.slow
def test_every_rank_gets_its_own_skip_counter_back(shards_copy: Path, tmp_path: Path, pools) -> None:
    results = pools(2).run(_skips_across_a_checkpoint, str(shards_copy), str(tmp_path / "state.json"))
    # reference: each rank's loader alone in this process (the order does not depend on processes)
    cfg = latent_cfg(shards_copy, 8)
    for rank, got in enumerate(results):
        alone = build_train_loader(cfg, rank, 2, 4, 1, 0)
        counts = [alone.skipped_samples for _ in zip(range(STEPS + MORE), alone)]
        assert got["before"] == counts[STEPS - 1] and got["restored"] == got["before"]
        assert got["after"] == counts[-1]
    assert results[0]["before"] != results[1]["before"]  # the damage made the ranks differ
    state = results[0]["state"]
    assert state["skipped_per_rank"] == [r["before"] for r in results] and state["skipped"] == sum(state["skipped_per_rank"])
    # another world size: rank 0 carries the total, the others 0, so the logged sum continues exactly
    for world in (1, 4):
        loaders = [build_train_loader(latent_cfg(shards_copy, 8), r, world, 8 // world, 1, STEPS) for r in range(world)]
        for loader in loaders:
            loader.load_state_dict(state)
        assert [loader.skipped_samples for loader in loaders] == [state["skipped"]] + [0] * (world - 1)


@pytest.fixture
def shards_copy(tmp_path: Path) -> Path:
    root = write_latent_shards(tmp_path / "damaged")
    _damage_rank1_slots(root, STEPS)
    return root


@pytest.mark.slow
def test_training_resume_on_2_ranks_keeps_the_skip_count(tmp_path: Path) -> None:
    """engine/train.py on 2 ranks over damaged shards, checkpoint at step STEPS, resume to STEPS + MORE:
    the logged data/skipped_samples equals the number of corrupt reads of those steps (1 process)."""
    from tests.train_utils import QUICKSTART, TINY, read_metrics, run_train

    root = write_latent_shards(tmp_path / "shards", side=4)
    _damage_rank1_slots(root, STEPS)
    common = TINY + [f"train.output_dir={tmp_path / 'run'}", "data.source=imagenet", f"data.shards={root}",
                     "data.latent=true", "data.random_flip=true", "model.in_channels=4", "model.input_size=4",
                     "model.num_classes=5", "train.seed=3", f"train.save_every={STEPS}"]
    run_train(QUICKSTART, common + [f"train.max_steps={STEPS}"], nproc=2)
    run_train(QUICKSTART, common + [f"train.max_steps={STEPS + MORE}", "train.resume=auto"], nproc=2)
    logged = {r["step"]: r["data/skipped_samples"] for r in read_metrics(tmp_path / "run") if "data/skipped_samples" in r}
    alone = build_train_loader(latent_cfg(root, 8, "model.input_size=4"), 0, 1, 8, 1, 0)
    counts = [alone.skipped_samples for _ in zip(range(STEPS + MORE), alone)]
    assert logged[STEPS] == counts[STEPS - 1] > 0
    assert logged[STEPS + MORE] == counts[-1]
