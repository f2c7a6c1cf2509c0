"""benchmarks/ablation.py: the four models are at equal activated params; its FID is 0 on identical sets;
its TC baseline drops no token."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.ablation import CONFIG, Settings, npz_pixels
from engine.config import load_config
from engine.data import load_digits_split
from engine.digits_eval import heldout_pixel_statistics, pixel_fid
from engine.params import count_params
from models import build_model, moe


def test_models_apply_the_dense_parameters_per_token_plus_their_routers(tmp_path):
    settings = Settings(seeds=1, steps=10, batch=8, eval_samples=10, sample_steps=2, jobs=1, out=tmp_path)
    dense = count_params(load_config(str(CONFIG), settings.overrides("Dense", 0)))[2]
    for model in ("TC", "EC", "DiffMoE"):
        cfg = load_config(str(CONFIG), settings.overrides(model, 0))
        routers = (cfg.model.depth // cfg.model.moe.every) * cfg.model.hidden_size * cfg.model.moe.num_experts
        assert count_params(cfg)[2] == dense + routers, model


def test_pixel_fid_is_zero_for_the_reference_itself_and_positive_for_noise(tmp_path):
    images, _ = load_digits_split("heldout")
    reference = heldout_pixel_statistics(8)
    np.savez(tmp_path / "same.npz", arr_0=np.repeat(images[..., None], 3, axis=-1))
    assert pixel_fid(npz_pixels(tmp_path / "same.npz"), reference) == pytest.approx(0.0, abs=1e-6)
    noise = np.random.default_rng(0).integers(0, 256, (len(images), 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "noise.npz", arr_0=noise)
    assert pixel_fid(npz_pixels(tmp_path / "noise.npz"), reference) > 10


def test_tc_is_the_reference_tc_dit_and_drops_no_token_in_training(tmp_path):
    settings = Settings(seeds=1, steps=10, batch=8, eval_samples=10, sample_steps=2, jobs=1, out=tmp_path)
    cfg = load_config(str(CONFIG), settings.overrides("TC", 0))
    torch.manual_seed(0)
    model = build_model(cfg).train()
    x = torch.randn(16, cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    model(x, torch.rand(16), torch.arange(16) % 10)
    stats = moe.collect_stats(model)
    dropped = {k: float(v) for k, v in stats.items() if k.endswith("dropped_frac")}
    assert len(dropped) == cfg.model.depth // cfg.model.moe.every and all(v == 0.0 for v in dropped.values())
    # every token reached exactly its top-1 expert
    assert all(float(v) == 1.0 for k, v in stats.items() if k.endswith("experts_per_token"))
