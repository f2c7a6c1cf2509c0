"""TensorBoard panels of a real (tiny) DiffMoE run, and the dynamic-inference activated-params profile."""
from __future__ import annotations

import math

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine.activated_params import activated_params_profile, supports_dynamic_inference
from engine.config import load_config
from engine.data.vae import LatentEncoder
from engine.train_events import GridPixels
from models import DiT, moe
from models.diffusion import build_diffusion
from tests.test_sample import tiny_vae
from tests.train_utils import QUICKSTART, TINY, read_metrics, run_train

TINY_DIFFMOE = ["model.moe.routing=diffmoe", "model.moe.num_experts=4", "model.moe.every=2"]


def test_tiny_diffmoe_run_writes_every_panel(tmp_path):
    run = tmp_path / "run"
    run_train(QUICKSTART, TINY + TINY_DIFFMOE + [f"train.output_dir={run}", "train.max_steps=2",
                                                 "train.sample_every=2", "eval.num_samples=10"])
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    texts = set(events.Tags()["tensors"])  # add_text is stored as a tensor summary
    expected = {
        "loss",
        "samples_per_sec", "tokens_per_sec", "tflops_per_device", "memory/peak_rss_gb",
        "moe/layer1/predictor_acc", "moe/layer1/compute_by_t/0", "comm/alltoall_bytes",
        "eval/class_acc", "eval/activated_params", "eval/activated_params_by_class/0",
        "eval/activated_params_by_class/9", "eval/activated_params_by_t/0.0-0.1", "eval/activated_params_by_t/0.5-0.6",
    }
    assert expected - scalars == set()
    assert any(tag.startswith("loss_by_t/") for tag in scalars)  # only buckets some sample fell in
    assert {"moe/layer1/load_by_t", "samples/ema"} <= images
    assert "eval/activated_params/text_summary" in texts

    final = [r for r in read_metrics(run) if "eval/activated_params" in r][-1]
    # the overall mean is the mean of the per-class means (equal samples per class)
    assert math.isclose(final["eval/activated_params"], sum(final["eval/activated_params_by_class"]) / 10, rel_tol=1e-6)


def _tiny_diffmoe(threshold_shift: float = 0.0) -> tuple[DiT, object]:
    cfg = load_config(QUICKSTART, TINY + TINY_DIFFMOE + [f"model.moe.threshold_shift={threshold_shift}"])
    torch.manual_seed(0)
    model = DiT(cfg.model)
    return model, build_diffusion(cfg), cfg


def test_profile_matches_nominal_params_when_every_expert_takes_every_token():
    model, objective, _ = _tiny_diffmoe()
    assert supports_dynamic_inference(model)
    for layer in moe.moe_layers(model):
        layer.predictor.threshold.fill_(-1.0)  # sigmoid > -1 always: every expert takes every token
    profile = activated_params_profile(model, objective, num_classes=2, samples_per_class=2, cfg_scale=1.0, steps=4,
                                       sampler="euler", threshold_shift=0.0)
    layers = list(moe.moe_layers(model))
    in_moe = {id(p) for layer in layers for p in layer.parameters()}
    dense = sum(p.numel() for p in model.parameters() if id(p) not in in_moe)
    # hand count: all E experts + router per token in every MoE layer, predictor excluded
    expected = dense + sum(layer.num_experts * layer.experts.params_per_expert()
                           + sum(p.numel() for p in layer.router.parameters()) for layer in layers)
    assert torch.allclose(profile["by_class"], torch.full((2,), float(expected), dtype=torch.float64))
    # 4 Euler steps at t = 0, 0.25, 0.5, 0.75: buckets 0, 2, 5, 7 filled, the rest NaN
    filled = [i for i, v in enumerate(profile["by_t"].tolist()) if v == v]
    assert filled == [0, 2, 5, 7]
    assert all(layer.inference == "static" for layer in layers)  # restored


def test_higher_threshold_shift_spends_less():
    model, objective, _ = _tiny_diffmoe()
    kwargs = dict(num_classes=2, samples_per_class=2, cfg_scale=1.0, steps=2, sampler="euler")
    for layer in moe.moe_layers(model):
        layer.predictor.threshold.fill_(0.5)
    low = activated_params_profile(model, objective, threshold_shift=-0.2, **kwargs)["mean"]
    high = activated_params_profile(model, objective, threshold_shift=0.2, **kwargs)["mean"]
    assert high < low


def test_grid_pixels_decode_latents_with_the_vae(tmp_path):
    tiny_vae(tmp_path / "vae")
    cfg = load_config(QUICKSTART, TINY + ["model.in_channels=4", "model.input_size=4", "data.latent=true",
                                          f"data.vae={tmp_path / 'vae'}"])
    latents = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    pixels = GridPixels(cfg, torch.device("cpu"))(latents)
    reference = LatentEncoder(tmp_path / "vae", 8, "cpu").decode(latents).float().clamp(-1, 1)
    assert pixels.shape == (3, 3, 8, 8)  # 4x4 latents -> 8x8 RGB
    assert torch.allclose(pixels, ((reference + 1) * 127.5).round() / 127.5 - 1)
    pixel_cfg = load_config(QUICKSTART, TINY)
    assert GridPixels(pixel_cfg, torch.device("cpu"))(latents) is latents  # pixel models: unchanged
