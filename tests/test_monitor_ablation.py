"""benchmarks/ablation.py: the four models are at equal activated params; its FID is 0 on identical sets."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.ablation import CONFIG, Settings, heldout_statistics, pixel_fid
from engine.config import load_config
from engine.data import load_digits_split
from engine.params import count_params


def test_models_apply_the_dense_parameters_per_token_plus_their_routers(tmp_path):
    settings = Settings(seeds=1, steps=10, batch=8, eval_samples=10, sample_steps=2, jobs=1, out=tmp_path)
    dense = count_params(load_config(str(CONFIG), settings.overrides("Dense", 0)))[2]
    for model in ("TC", "EC", "DiffMoE"):
        cfg = load_config(str(CONFIG), settings.overrides(model, 0))
        routers = (cfg.model.depth // cfg.model.moe.every) * cfg.model.hidden_size * cfg.model.moe.num_experts
        assert count_params(cfg)[2] == dense + routers, model


def test_pixel_fid_is_zero_for_the_reference_itself_and_positive_for_noise(tmp_path):
    images, _ = load_digits_split("heldout")
    reference = heldout_statistics(8)
    np.savez(tmp_path / "same.npz", arr_0=np.repeat(images[..., None], 3, axis=-1))
    assert pixel_fid(tmp_path / "same.npz", reference) == pytest.approx(0.0, abs=1e-6)
    noise = np.random.default_rng(0).integers(0, 256, (len(images), 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "noise.npz", arr_0=noise)
    assert pixel_fid(tmp_path / "noise.npz", reference) > 10
