"""engine/sample.py: index -> (label, seed, rank) bookkeeping, and the real CLI on 1 and 2 ranks.

The multi-rank tests run `python engine/sample.py` as separate processes joined over gloo on
127.0.0.1 (what torchrun does), on a tiny DiffMoE model saved in the exported-weights format.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml

from engine.config import load_config, to_dict
from engine.export import FORMAT
from engine.sample import (SampleError, check_settings, labels_of, parse_classes, rank_batches, read_png,
                           seeds_of)
from models import build_model
from parallel.zero import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = ["name=tiny", "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "model.input_size=8",
        "model.in_channels=1", "model.num_classes=10", "model.moe.routing=diffmoe", "model.moe.num_experts=4",
        "diffusion.sample_steps=4", "eval.num_samples=10"]


# --------------------------------------------------------------------------------------------
# Bookkeeping (no model)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_batches_are_the_same_global_batches_whatever_the_world_size(world_size):
    n, b = 23, 4
    reference = rank_batches(n, b, 0, 1)
    assert [list(r) for r in reference] == [list(range(s, min(s + b, n))) for s in range(0, n, b)]
    dealt = [batch for rank in range(world_size) for batch in rank_batches(n, b, rank, world_size)]
    assert sorted(dealt, key=lambda r: r.start) == reference  # same batches, each exactly once


def test_labels_and_seeds_follow_the_sample_index():
    assert labels_of(range(3, 8), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]).tolist() == [3, 4, 5, 6, 7]
    assert labels_of(range(0, 5), [7, 2]).tolist() == [7, 2, 7, 2, 7]
    all_seeds = seeds_of(range(0, 10), seed=1)
    assert seeds_of(range(4, 7), seed=1) == all_seeds[4:7]  # a sample's noise ignores its batch
    assert len(set(all_seeds)) == 10 and set(all_seeds).isdisjoint(seeds_of(range(0, 10), seed=2))


def test_class_list_errors():
    assert parse_classes(None, 4) == [0, 1, 2, 3]
    assert parse_classes("3, 1", 4) == [3, 1]
    for text in ["4", "a,b", ""]:
        with pytest.raises(SampleError, match="--classes"):
            parse_classes(text, 4)


def test_output_folder_of_other_settings_is_refused(tmp_path):
    settings = {"num_samples": 10, "cfg_scale": 1.0}
    check_settings(tmp_path, settings)  # no settings.json yet: fine
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    check_settings(tmp_path, settings)  # same request: resumes
    with pytest.raises(SampleError, match=r"other settings \(cfg_scale 1.0 vs 4.0\)"):
        check_settings(tmp_path, {**settings, "cfg_scale": 4.0})


# --------------------------------------------------------------------------------------------
# The CLI on real processes
# --------------------------------------------------------------------------------------------


def export_tiny_model(path: Path, overrides: list[str]) -> None:
    """A tiny DiffMoE model in engine.export's format, its zero-initialised outputs perturbed so
    the images depend on every layer."""
    cfg = load_config(None, TINY + overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(path), metadata={"format": FORMAT, "config": yaml.safe_dump(to_dict(cfg))})


def tiny_vae(path: Path) -> None:
    """A random 2x-downsampling diffusers AutoencoderKL with 4 latent channels, saved locally."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=8).save_pretrained(path)


def launch(world_size: int, args: list[str]) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "engine/sample.py", *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs: list[subprocess.Popen]) -> dict:
    """Wait for every rank; rank 0's last stdout line is the JSON result."""
    outputs = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
        outputs.append(out)
    return json.loads(outputs[0].strip().splitlines()[-1])


def run_sample(world_size: int, args: list[str]) -> dict:
    return finish(launch(world_size, args))


@pytest.mark.slow
def test_one_and_two_ranks_give_identical_images_and_resume(tmp_path):
    """Latent model (decoded by a local VAE), static DiffMoE inference pooling over uneven batches."""
    tiny_vae(tmp_path / "vae")
    weights = tmp_path / "model.safetensors"
    export_tiny_model(weights, ["model.in_channels=4", "model.input_size=4", "data.latent=true",
                                f"data.vae={tmp_path / 'vae'}"])
    common = ["--weights", str(weights), "--num-samples", "10", "--batch-size", "3", "--cfg-scale", "2.0",
              "--classes", "1,5,7", "--seed", "3", "--no-progress"]
    one = run_sample(1, [*common, "--out", str(tmp_path / "one")])
    two = run_sample(2, [*common, "--out", str(tmp_path / "two")])

    npz_name = "samples_10x8x8x3.npz"  # latents 4x4 -> 8x8 RGB pixels through the VAE
    assert Path(one["npz"]).name == npz_name == Path(two["npz"]).name
    with np.load(one["npz"]) as a, np.load(two["npz"]) as b:
        assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (10, 8, 8, 3)
        assert a["arr_0"].std() > 1  # not a blank image
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        assert a["arr_1"].tolist() == b["arr_1"].tolist() == [1, 5, 7] * 3 + [1]
        for i in range(10):
            np.testing.assert_array_equal(read_png(tmp_path / "one" / "images" / f"{i:06d}.png"), a["arr_0"][i])
    assert (tmp_path / "one" / "grid.png").is_file() and (tmp_path / "two" / "summary.json").is_file()
    assert one["generated"] == two["generated"] == 10
    assert one["avg_activated_params"] == pytest.approx(two["avg_activated_params"], rel=1e-12)
    assert one["inference"] == "static" and one["avg_activated_params"] > 0

    # Resume: lose two images of different batches; one rank redoes exactly those batches.
    for i in (4, 9):
        (tmp_path / "two" / "images" / f"{i:06d}.png").unlink()
    Path(two["npz"]).unlink()
    resumed = run_sample(1, [*common, "--out", str(tmp_path / "two")])
    assert resumed["generated"] == 4  # batches [3, 6) and [9, 10)
    with np.load(one["npz"]) as a, np.load(resumed["npz"]) as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])


@pytest.mark.slow
def test_dynamic_inference_threshold_shift_trades_compute(tmp_path):
    weights = tmp_path / "model.safetensors"
    export_tiny_model(weights, [])
    runs = {shift: launch(1, ["--weights", str(weights), "--num-samples", "6", "--batch-size", "6", "--no-progress",
                              "--inference", "dynamic", f"--threshold-shift={shift}", "--out", str(tmp_path / str(shift))])
            for shift in (-0.3, 0.3)}
    more, less = finish(runs[-0.3]), finish(runs[0.3])
    assert more["inference"] == less["inference"] == "dynamic" and less["threshold_shift"] == 0.3
    assert less["avg_activated_params"] < more["avg_activated_params"]
    assert Path(more["npz"]).name == "samples_6x8x8x1.npz"  # pixel space, one channel
