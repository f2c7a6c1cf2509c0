"""Checkpoint save/load on real DeepSpeed ZeRO engines over real gloo ranks: exact round trip, expert
resharding between layouts, checksums, keep-last-K, resume resolution.

References are independent of parallel.checkpoint: DeepSpeed's own whole-tensor accessors
(`safe_get_full_fp32_param`, `safe_get_full_optimizer_state`) on the engine that saved, and one
more identical training step on the saving and the restored engine.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from parallel.checkpoint.zero_state import ZeroOptimizerState
from tests.checkpoint_utils import build_engine, gathered, mismatches, reference_state, state_snapshot, train_step

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------ rank functions


def _round_trip(overrides: list[str], root: str) -> dict:
    """Train 2 steps, save; restore into a fresh engine; one more identical step on both."""
    from parallel.checkpoint import load_checkpoint, save_checkpoint

    cfg, saved, ema_saved = build_engine(overrides)
    for step in (1, 2):
        train_step(saved, ema_saved, step)
    train_state = {"step": 2, "data": {"epoch": 0, "position": 8}}
    rng_at_save = torch.get_rng_state()
    path = save_checkpoint(Path(root), 2, saved, ema_saved, train_state, cfg)
    at_save = reference_state(saved, ema_saved)

    _, restored, ema_restored = build_engine(overrides, seed=1)  # different dense init
    before_load = {k: v.detach().clone() for k, v in restored.module.state_dict().items()}
    loaded_state = load_checkpoint(path, restored, ema_restored, cfg)
    rng_restored = torch.equal(torch.get_rng_state(), rng_at_save)  # building `restored` consumed random numbers
    model_after_load = {f"model/{k}": v.detach().cpu().clone() for k, v in restored.module.state_dict().items()}
    ema_after_load = {f"ema/{k}": v.cpu().clone() for k, v in ema_restored.state_dict().items()}
    immediate = mismatches({k: v for k, v in at_save.items() if k.startswith(("model/", "ema/"))},
                           {**model_after_load, **ema_after_load})
    losses = (train_step(saved, ema_saved, 3), train_step(restored, ema_restored, 3))
    return {
        "path": str(path),
        "train_state": loaded_state,
        "rng_restored": rng_restored,
        "changed_by_load": any(not torch.equal(before_load[k], v) for k, v in restored.module.state_dict().items()),
        "immediate_mismatches": immediate,
        "after_step_mismatches": mismatches(reference_state(saved, ema_saved), reference_state(restored, ema_restored)),
        "losses": losses,
    }


def _save_steps(overrides: list[str], root: str, steps: list[int]) -> list[str]:
    from parallel.checkpoint import save_checkpoint

    cfg, engine, ema = build_engine(overrides)
    paths = []
    for step in steps:
        train_step(engine, ema, step)
        paths.append(str(save_checkpoint(Path(root), step, engine, ema, {"step": step}, cfg)))
    return paths


def _save_unserializable_state(overrides: list[str], root: str) -> tuple[str, list[str]]:
    from parallel.checkpoint import CheckpointError, save_checkpoint

    cfg, engine, ema = build_engine(overrides)
    train_step(engine, ema, 1)
    save_checkpoint(Path(root), 1, engine, ema, {"step": 1}, cfg)
    try:
        save_checkpoint(Path(root), 2, engine, ema, {"step": 2, "data": torch.zeros(1)}, cfg)
    except CheckpointError as e:
        return str(e), sorted(p.name for p in Path(root).iterdir())
    return "no error", []


def _save_for_reshard(overrides: list[str], root: str) -> dict[str, torch.Tensor]:
    from parallel.checkpoint import save_checkpoint

    cfg, engine, ema = build_engine(overrides)
    for step in (1, 2, 3):
        train_step(engine, ema, step)
    save_checkpoint(Path(root), 3, engine, ema, {"step": 3}, cfg)
    return reference_state(engine, ema)


def _loaded_state(overrides: list[str], path: str) -> dict[str, torch.Tensor]:
    """Whole tensors of an engine restored from `path` (before any step: master and moments read
    from the ZeRO partitions, since DeepSpeed links its own accessors only inside a step)."""
    from parallel.checkpoint import load_checkpoint

    cfg, engine, ema = build_engine(overrides, seed=1)
    load_checkpoint(Path(path), engine, ema, cfg)
    zero = ZeroOptimizerState(engine)
    return state_snapshot(engine, ema, lambda t, key: gathered(zero, t, key) if zero.manages(t) else None)


def _async_save(overrides: list[str], root: str) -> dict:
    """An async save of step 2, then training on while it is written: the published checkpoint holds
    the state at the save, which a fresh engine restores exactly."""
    from parallel.checkpoint import Checkpointer, load_checkpoint

    cfg, engine, ema = build_engine(overrides + ["train.async_checkpoint=true"])
    saver = Checkpointer(Path(root), cfg)
    for step in (1, 2):
        train_step(engine, ema, step)
    at_save = reference_state(engine, ema)
    returned = saver.save(2, engine, ema, {"step": 2})
    published_early = (Path(root) / "latest").exists()  # only poll/wait publish
    train_step(engine, ema, 3)  # changes every tensor the background thread is writing
    path = saver.wait()
    _, restored, ema_restored = build_engine(overrides, seed=1)
    load_checkpoint(path, restored, ema_restored, cfg)
    zero = ZeroOptimizerState(restored)
    loaded = state_snapshot(restored, ema_restored, lambda t, key: gathered(zero, t, key) if zero.manages(t) else None)
    keys = [k for k in at_save if k.startswith(("model/", "master/", "exp_avg", "ema/"))]
    return {"returned": returned, "published_early": published_early, "path": str(path),
            "mismatches": mismatches({k: at_save[k] for k in keys}, {k: loaded[k] for k in keys})}


def _load_error(overrides: list[str], path: str) -> str:
    from parallel.checkpoint import CheckpointError, load_checkpoint

    cfg, engine, ema = build_engine(overrides)
    try:
        load_checkpoint(Path(path), engine, ema, cfg)
    except CheckpointError as e:
        return str(e)
    return "no error"


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("world,ep,zero,precision", [(1, 1, 1, "fp32"), (1, 1, 2, "fp32"), (2, 2, 1, "fp32"),
                                                     (2, 2, 2, "fp32"), (2, 1, 2, "fp32"), (2, 2, 2, "bf16")])
def test_round_trip_is_exact(pools, tmp_path, world, ep, zero, precision):
    """Weights, fp32 masters, Adam moments and step, EMA, lr schedule and counters come back bit for bit,
    and the next step of the restored engine equals the next step of the engine that saved."""
    overrides = [f"parallel.ep_size={ep}", f"parallel.zero_stage={zero}", f"train.precision={precision}"]
    results = pools(world).run(_round_trip, overrides, str(tmp_path))
    for rank, r in enumerate(results):
        assert r["changed_by_load"], f"rank {rank}: loading changed nothing (test would be vacuous)"
        assert r["rng_restored"], f"rank {rank}"
        assert r["immediate_mismatches"] == [], f"rank {rank}"
        assert r["after_step_mismatches"] == [], f"rank {rank}"
        assert r["losses"][0] == r["losses"][1]
        assert r["train_state"] == {"step": 2, "data": {"epoch": 0, "position": 8}}
    files = sorted(p.name for p in Path(results[0]["path"]).iterdir())
    assert files == ["manifest.json", *(f"rank_{r:05d}.safetensors" for r in range(world))]
    assert (tmp_path / "latest").read_text().strip() == "step_0000002"


def _expected_layout(saved: list[dict[str, torch.Tensor]], ep_rank: int, ep_size: int) -> dict[str, torch.Tensor]:
    """The state a rank of EP rank `ep_rank` of `ep_size` must hold, built from the saving ranks'
    states (world 2, ep_size 2): dense tensors from rank 0, expert rows from the rank that held them."""
    per_rank = 4 // ep_size
    wanted = range(ep_rank * per_rank, (ep_rank + 1) * per_rank)
    out = {}
    for key, value in saved[0].items():
        if ".experts." in key:
            out[key] = torch.cat([saved[e // 2][key][e % 2:e % 2 + 1] for e in wanted])
        else:
            out[key] = value
    return out


def test_reshard_experts_and_optimizer_state(pools, tmp_path):
    """Saved at world 2 / ep_size 2 (ZeRO-2), loaded at world 1 / ep_size 1 and at world 4 / ep_size 2 (ZeRO-1):
    every expert, its master weight, moments and EMA land on the rank that holds it now."""
    saved = pools(2).run(_save_for_reshard, ["parallel.ep_size=2", "parallel.zero_stage=2"], str(tmp_path))
    for key in saved[0]:
        if ".experts." not in key:  # dense state is identical on the two saving ranks
            assert torch.equal(saved[0][key], saved[1][key]), key
    assert not torch.equal(saved[0]["model/blocks.1.ffn.experts.w1"], saved[1]["model/blocks.1.ffn.experts.w1"])
    path = str(tmp_path / "step_0000003")

    one = pools(1).run(_loaded_state, ["parallel.ep_size=1", "parallel.zero_stage=2"], path)[0]
    assert one["model/blocks.1.ffn.experts.w1"].shape[0] == 4
    assert mismatches(_expected_layout(saved, 0, 1), one) == []

    four = pools(4).run(_loaded_state, ["parallel.ep_size=2", "parallel.zero_stage=1"], path)
    for rank, state in enumerate(four):
        assert mismatches(_expected_layout(saved, rank % 2, 2), state) == [], f"rank {rank}"


def test_keep_last_k_and_latest(pools, tmp_path):
    overrides = ["parallel.ep_size=2", "train.keep_checkpoints=2"]
    paths = pools(2).run(_save_steps, overrides, str(tmp_path), [1, 2, 3, 4])[0]
    assert paths[-1] == str(tmp_path / "step_0000004")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000003", "step_0000004"]
    assert (tmp_path / "latest").read_text().strip() == "step_0000004"


def test_failed_save_raises_on_every_rank_and_keeps_the_previous(pools, tmp_path):
    results = pools(2).run(_save_unserializable_state, ["parallel.ep_size=2"], str(tmp_path))
    for message, entries in results:
        assert "train_state must hold JSON values only" in message and "step_0000002" in message, message
        assert entries == ["latest", "step_0000001"]  # the failed save's temporary folder is gone too
    assert (tmp_path / "latest").read_text().strip() == "step_0000001"


def test_corrupted_file_is_named_on_every_rank(pools, tmp_path):
    """A flipped byte in the file only rank 1 checks: both ranks fail (no hang) naming that file."""
    pools(2).run(_save_steps, ["parallel.ep_size=2"], str(tmp_path), [1])
    bad = tmp_path / "step_0000001" / "rank_00001.safetensors"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad.write_bytes(bytes(data))
    errors = pools(2).run(_load_error, ["parallel.ep_size=2"], str(tmp_path / "step_0000001"))
    for rank, message in enumerate(errors):
        assert "failed on rank 1: " in message, f"rank {rank}: {message}"  # rank 1 checks that file
        assert str(bad) in message and "corrupted" in message and "sha256" in message, f"rank {rank}: {message}"


def test_every_rank_writes_only_its_share(pools, tmp_path):
    """World 4, ep_size 2: the ranks' pieces tile every saved tensor exactly once (element ranges of the
    global tensors, whose sizes come from the model at ep_size 1), and every rank writes expert state:
    each expert shard is spread over its two expert-data-parallel ranks."""
    import math

    from engine.config import load_config
    from models import build_model
    from parallel.checkpoint import read_manifest
    from tests.checkpoint_utils import TINY_MOE

    pools(4).run(_save_steps, ["parallel.ep_size=2"], str(tmp_path), [1])
    manifest = read_manifest(tmp_path / "step_0000001")
    files = manifest["files"]
    assert sorted(files) == [f"rank_{r:05d}.safetensors" for r in range(4)]
    whole = {name: math.prod(t.shape) for name, t in build_model(load_config(None, TINY_MOE)).state_dict().items()}
    ranges: dict[str, list[tuple[int, int]]] = {}
    for rec in files.values():
        for key, (lo, hi) in rec["pieces"].items():
            ranges.setdefault(key, []).append((lo, hi))
    sections = {"model", "exp_avg", "exp_avg_sq", "ema"}
    for key, spans in ranges.items():
        section, name = key.split("/", 1)
        assert section in sections
        spans.sort()
        assert spans[0][0] == 0 and spans[-1][1] == whole[name], key
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), (key, spans)  # no gap, no overlap
    assert {k.split("/", 1)[1] for k in ranges if k.startswith("model/")} == set(whole)
    for name, rec in files.items():
        assert any(".experts." in key for key in rec["pieces"]), name


def test_async_save_publishes_the_state_at_save_time(pools, tmp_path):
    results = pools(2).run(_async_save, ["parallel.ep_size=2"], str(tmp_path))
    for rank, r in enumerate(results):
        assert r["returned"] is None and not r["published_early"], rank
        assert r["path"] == str(tmp_path / "step_0000002"), rank
        assert r["mismatches"] == [], rank
    assert (tmp_path / "latest").read_text().strip() == "step_0000002"
