"""The indexed shard reader and the training loader: world-size invariance, epochs, resume, corruption.

Synthetic latent shards make every check readable: sample i stores latent [image, flip] =
[+(i+1), -(i+1)] everywhere and class i % 5, so x tells which sample and which flip was taken.
"""
from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds

from engine.config import load_config
from engine.data import DataError, build_train_loader, load_digits_split, prepare_dataset
from engine.data.digits import build_digits_shards
from engine.data.make_shards import index_existing
from engine.data.order import GlobalOrder
from engine.data.shards import INDEX_FILE, ShardIndex, ShardReader, shard_name, write_index, write_shard

N, SHARD_SIZES = 48, (10, 10, 10, 10, 8)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _latent_sample(i: int, side: int) -> dict:
    latent = np.stack([np.full((4, side, side), i + 1.0), np.full((4, side, side), -(i + 1.0))]).astype(np.float16)
    return {"__key__": f"{i:05d}", "latent.npy": _npy(latent), "cls": str(i % 5)}


def write_latent_shards(root: Path, sizes: tuple[int, ...] = SHARD_SIZES, side: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    names, first = [], 0
    for number, size in enumerate(sizes):
        names.append(shard_name(number))
        write_shard(root / names[-1], (_latent_sample(i, side) for i in range(first, first + size)))
        first += size
    write_index(root, names, {"kind": "imagenet", "num_classes": 5})
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_latent_shards(tmp_path_factory.mktemp("latents"))


def latent_cfg(root: Path, global_batch: int, *extra: str):
    return load_config(None, ["data.source=imagenet", f"data.shards={root}", "data.latent=true",
                              "data.random_flip=true", "model.in_channels=4", "model.input_size=2",
                              "model.num_classes=5", f"train.global_batch_size={global_batch}",
                              "data.num_workers=0", "train.seed=3", *extra])


def sample_of(x: torch.Tensor) -> tuple[int, bool]:
    """(sample id, flipped) encoded in a synthetic latent."""
    v = float(x.flatten()[0])
    return int(abs(v)) - 1, v < 0


def global_batches(cfg, world_size: int, grad_accum: int, steps: int, start_step: int = 0) -> list[dict]:
    """Each step's global batch assembled from every rank's micro-batches, ordered by `index`."""
    mb = cfg.train.global_batch_size // (world_size * grad_accum)
    per_rank = []
    for rank in range(world_size):
        loader = build_train_loader(cfg, rank, world_size, mb, grad_accum, start_step)
        per_rank.append([step for _, step in zip(range(steps), loader)])
    out = []
    for s in range(steps):
        parts = [b for rank_steps in per_rank for b in rank_steps[s]]
        assert all(b["step"] == start_step + s for b in parts)
        index = torch.cat([b["index"] for b in parts])
        order = torch.argsort(index)
        assert torch.equal(index[order], torch.arange(cfg.train.global_batch_size))
        keys = [k for b in parts for k in b["key"]]
        out.append({"x": torch.cat([b["x"] for b in parts])[order], "y": torch.cat([b["y"] for b in parts])[order],
                    "key": [keys[i] for i in order]})
    return out


def test_reader_matches_webdataset_and_indexes_foreign_tars(tmp_path: Path) -> None:
    root = write_latent_shards(tmp_path / "shards", (3, 2))
    for name, fmt in (("pax.tar", tarfile.PAX_FORMAT), ("gnu.tar", tarfile.GNU_FORMAT)):
        with tarfile.open(root / name, "w", format=fmt) as tar:  # long names need pax / GNU headers
            for i in range(3):
                for suffix, data in (("cls", b"7"), ("txt", f"caption {i} é".encode())):
                    info = tarfile.TarInfo(f"{'d' * 120}/sample_é{i}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / INDEX_FILE).unlink()
    index = index_existing(root)
    assert index["num_samples"] == 11 and index["members"] == ["cls"]
    reader = ShardReader(ShardIndex(root))
    reference = list(wds.WebDataset([str(root / s["name"]) for s in index["shards"]], shardshuffle=False))
    assert len(reference) == 11
    for i, expected in enumerate(reference):
        got = reader.read(i)
        assert got["__key__"] == expected["__key__"]
        assert {k: v for k, v in got.items() if not k.startswith("__")} == \
               {k: v for k, v in expected.items() if not k.startswith("__")}


def test_global_batch_is_the_same_for_world_1_and_2(shards: Path) -> None:
    cfg = latent_cfg(shards, 8)
    steps = 9  # 6 steps per epoch: crosses into the second epoch
    reference = global_batches(cfg, world_size=1, grad_accum=1, steps=steps)
    for world_size, grad_accum in ((2, 1), (2, 2), (1, 4)):
        other = global_batches(cfg, world_size, grad_accum, steps)
        for a, b in zip(reference, other):
            assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"]) and a["key"] == b["key"]
    # each epoch is a permutation; flips are drawn per sample (both occur); labels match the samples
    ids = [sample_of(x)[0] for step in reference for x in step["x"]]
    assert sorted(ids[:N]) == list(range(N)) and sorted(ids[N : 2 * N]) != ids[N : 2 * N]
    flips = [sample_of(x)[1] for step in reference for x in step["x"]]
    assert 0 < sum(flips) < len(flips)
    assert all(int(y) == sample_of(x)[0] % 5 for step in reference for x, y in zip(step["x"], step["y"]))


def test_one_epoch_on_2_ranks_x_2_workers_sees_every_sample_once(shards: Path) -> None:
    cfg = latent_cfg(shards, 8, "data.num_workers=2")
    seen, batches = [], {}
    for rank in range(2):
        loader = build_train_loader(cfg, rank, 2, 2, 2, 0)
        batches[rank] = [step for _, step in zip(range(N // 8), loader)]
        seen += [sample_of(x)[0] for step in batches[rank] for b in step for x in b["x"]]
    assert sorted(seen) == list(range(N))
    # worker processes do not change the result: compare with loading in the training process
    in_process = build_train_loader(latent_cfg(shards, 8), 1, 2, 2, 2, 0)
    for step, ref in zip(in_process, batches[1]):
        assert all(torch.equal(a["x"], b["x"]) and a["key"] == b["key"] for a, b in zip(step, ref))


def test_resume_mid_epoch_continues_with_the_next_samples(shards: Path) -> None:
    cfg = latent_cfg(shards, 4, "data.num_workers=1")
    uninterrupted = [step for _, step in zip(range(7), build_train_loader(cfg, 0, 1, 2, 2, 0))]
    first = build_train_loader(cfg, 0, 1, 2, 2, 0)
    for _ in zip(range(3), first):
        pass
    state = first.state_dict()
    assert state["step"] == 3
    resumed = build_train_loader(cfg, 0, 1, 2, 2, 0)
    resumed.load_state_dict(state)
    for a, b in zip(resumed, uninterrupted[3:]):
        assert a[0]["step"] == b[0]["step"] and all(torch.equal(x["x"], y["x"]) for x, y in zip(a, b))
    started = next(iter(build_train_loader(cfg, 0, 1, 2, 2, 5)))
    assert all(torch.equal(x["x"], y["x"]) for x, y in zip(started, uninterrupted[5]))


def _corrupt_member(root: Path, shard: str, key: str, suffix: str) -> None:
    with tarfile.open(root / shard) as tar:
        member = tar.getmember(f"{key}.{suffix}")
    with open(root / shard, "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"garbage!")


def test_corrupt_samples_are_replaced_counted_and_named(shards: Path, tmp_path: Path, caplog) -> None:
    root = tmp_path / "damaged"
    shutil.copytree(shards, root)
    _corrupt_member(root, shard_name(1), "00012", "latent.npy")
    spans = json.loads((root / "shard-000004.idx.json").read_text())["spans"]
    with open(root / shard_name(4), "r+b") as f:  # the last shard loses its tail: samples 46 (half), 47
        f.truncate(spans[6][0] + 700)
    cfg = latent_cfg(root, 8)
    with caplog.at_level(logging.WARNING, logger="engine.data.loader"):
        loader = build_train_loader(cfg, 0, 1, 8, 1, 0)
        epoch = [step for _, step in zip(range(N // 8), loader)]
    ids = [sample_of(x)[0] for step in epoch for x in step[0]["x"]]
    assert len(ids) == N and {12, 46, 47}.isdisjoint(ids)
    # each slot counts the corrupt samples it passed over: its own and any corrupt ones after it in the order
    epoch_order = GlobalOrder(3, N).samples_at(np.arange(N)).tolist()
    corrupt = {12, 46, 47}
    expected = sum(next(k for k in range(N) if epoch_order[(p + k) % N] not in corrupt) for p in range(N))
    assert expected >= 3 and loader.skipped_samples == expected and loader.state_dict()["skipped"] == expected
    assert "shard-000001.tar" in caplog.text and "00012" in caplog.text and "shard-000004.tar" in caplog.text
    # the replacement is part of the global order: still the same for another world size
    two = global_batches(cfg, world_size=2, grad_accum=1, steps=N // 8)
    assert all(torch.equal(step[0]["x"], other["x"]) for step, other in zip(epoch, two))


def stream_cfg(root: Path, *extra: str):
    return latent_cfg(root, 8, "data.order=stream", "data.num_workers=2", "data.shuffle_buffer=5", *extra)


def test_stream_order_is_deterministic_covers_an_epoch_and_resumes(tmp_path: Path) -> None:
    root = write_latent_shards(tmp_path / "s", (6,) * 8)  # 4 streams (2 ranks x 2 workers), 2 shards each
    cfg = stream_cfg(root)

    def run(rank: int, start: int, steps: int) -> list:
        loader = build_train_loader(cfg, rank, 2, 4, 1, start)
        return [[sample_of(x) for x in step[0]["x"]] for _, step in zip(range(steps), loader)]

    runs = {rank: run(rank, 0, 8) for rank in range(2)}
    assert run(0, 0, 8) == runs[0]
    epoch = [i for rank in range(2) for step in runs[rank][:6] for i, _ in step]
    assert sorted(epoch) == list(range(N))
    assert run(1, 3, 5) == runs[1][3:]  # resume at an odd step: the streams keep their micro-batches
    assert run(0, 7, 1) == runs[0][7:]  # into the second epoch (skips whole epochs by shard counts)


def test_digits_are_built_once_and_decode_to_the_sklearn_arrays(tmp_path: Path) -> None:
    cfg = load_config(None, [f"data.shards={tmp_path / 'digits'}", "model.in_channels=1", "model.input_size=8",
                             "model.num_classes=10", "train.global_batch_size=64", "data.num_workers=0"])
    root = prepare_dataset(cfg)
    stamp = (root / INDEX_FILE).stat().st_mtime_ns
    assert prepare_dataset(cfg) == root and (root / INDEX_FILE).stat().st_mtime_ns == stamp
    train_images, train_labels = load_digits_split("train")
    held_images, held_labels = load_digits_split("heldout")
    assert len(train_labels) + len(held_labels) == 1797 and set(np.unique(held_labels)) == set(range(10))
    from sklearn.datasets import load_digits

    sklearn = load_digits()
    reader = ShardReader(ShardIndex(root))
    assert reader.index.num_samples == len(train_labels)
    for i in range(reader.index.num_samples):
        raw = reader.read(i)
        j = json.loads(raw["json"])["sklearn_index"]
        pixels = np.asarray(PIL.Image.open(io.BytesIO(raw["png"])))
        assert np.array_equal(pixels, np.round(sklearn.images[j] * 255 / 16)) and int(raw["cls"]) == sklearn.target[j]
    # through the loader: one channel in [-1, 1], at 8x8 as stored and bilinearly upsampled to 16x16
    batch = next(iter(build_train_loader(cfg, 0, 1, 64, 1, 0)))[0]
    keys = [int(k) for k in batch["key"]]
    expected = torch.from_numpy(np.round(sklearn.images[keys] * 255 / 16)).float()[:, None] / 127.5 - 1
    assert batch["x"].shape == (64, 1, 8, 8) and torch.allclose(batch["x"], expected)
    assert batch["caption"][0].startswith("a handwritten digit ")
    cfg16 = load_config(None, [f"data.shards={root}", "model.in_channels=1", "model.input_size=16",
                               "model.num_classes=10", "train.global_batch_size=64", "data.num_workers=0"])
    up = next(iter(build_train_loader(cfg16, 0, 1, 64, 1, 0)))[0]["x"]
    assert torch.allclose(up, F.interpolate(expected, size=(16, 16), mode="bilinear", align_corners=False), atol=1e-5)


def test_a_killed_digits_build_leaves_no_half_dataset(tmp_path: Path, monkeypatch) -> None:
    import engine.data.digits as digits

    calls = []

    def fail_on_second_shard(path, samples, extra=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return write_shard(path, samples, extra)

    monkeypatch.setattr(digits, "write_shard", fail_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        build_digits_shards(tmp_path / "digits")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    build_digits_shards(tmp_path / "digits")
    assert ShardIndex(tmp_path / "digits").num_samples == len(load_digits_split("train")[1])


@pytest.mark.parametrize("override, message", [
    ("model.in_channels=3", "model.in_channels=3"),
    ("model.input_size=4", "model.input_size=4"),
    ("data.latent=false", "data.latent=true"),
    ("model.num_classes=2", "model.num_classes=2"),
    ("model.text.precomputed=true", "model.text.precomputed"),
])
def test_config_mismatches_name_the_key(shards: Path, override: str, message: str) -> None:
    with pytest.raises(DataError, match=message.replace(".", r"\.")):
        build_train_loader(latent_cfg(shards, 8, override), 0, 1, 8, 1, 0)


def test_batch_size_mismatch_and_missing_shards_are_clear(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train.global_batch_size=8"):
        build_train_loader(latent_cfg(shards, 8), 0, 2, 8, 1, 0)
    with pytest.raises(DataError, match="make_shards index"):
        build_train_loader(latent_cfg(tmp_path, 8), 0, 1, 8, 1, 0)
