"""Pieces of the training loop in one process: EMA math, per-index draws, metrics, monitor, sampling."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from engine.config import ConfigError, load_config
from engine.ema import EMA
from engine.monitor import Monitor, heatmap_image
from engine.sampling import generate, grid_array, grid_labels_and_seeds, save_grid
from engine.train_metrics import IntervalMeter
from engine.train_step import draw_training_inputs
from models import build_model
from models.diffusion import build_diffusion
from models.moe.layer import TIME_BUCKETS
from parallel.zero import batch_layout, deepspeed_config
from tests.train_utils import QUICKSTART

torch.set_num_threads(1)


def identity_sum(t: torch.Tensor) -> torch.Tensor:
    """all_reduce_sum of a world of one."""
    return t


# ----------------------------------------------------------------------------------------------- EMA

def two_param_model() -> nn.Module:
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.fill_(4.0)
    return model


def test_ema_update_matches_closed_form():
    model = two_param_model()
    ema = EMA(model)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, -2.0]]))
    ema.update(model, decay=0.9)  # 0.9 * old + 0.1 * new
    assert torch.allclose(ema.shadow["weight"], torch.tensor([[1.2, 1.6]]))
    with torch.no_grad():
        model.bias.fill_(14.0)
    ema.update(model, decay=0.5)
    assert torch.allclose(ema.shadow["weight"], torch.tensor([[2.1, -0.2]]))
    assert torch.allclose(ema.shadow["bias"], torch.tensor([9.0]))
    assert all(v.dtype == torch.float32 for v in ema.shadow.values())


def test_ema_decay_zero_tracks_and_bf16_params_keep_fp32_shadow():
    model = two_param_model().to(torch.bfloat16)
    ema = EMA(model)
    with torch.no_grad():
        model.bias.fill_(0.5)
    ema.update(model, decay=0.0)
    assert ema.shadow["bias"].dtype == torch.float32 and ema.shadow["bias"].item() == 0.5


def test_ema_applied_to_swaps_and_restores():
    model = two_param_model()
    ema = EMA(model)
    with torch.no_grad():
        model.weight.add_(10.0)
    live = model.weight.detach().clone()
    with ema.applied_to(model):
        assert torch.equal(model.weight, torch.tensor([[1.0, 2.0]]))
    assert torch.equal(model.weight, live)


def test_ema_state_dict_round_trip_and_errors():
    model = two_param_model()
    ema = EMA(model)
    other = EMA(nn.Linear(2, 1))
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(other.shadow[k], ema.shadow[k]) for k in ema.shadow)
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({"weight": torch.zeros(1, 2)})
    with pytest.raises(ValueError, match="'weight' has shape"):
        other.load_state_dict({"weight": torch.zeros(2, 2), "bias": torch.zeros(1)})


# ------------------------------------------------------------------------------ per-index draws

def cfg_for_draws(*overrides: str):
    return load_config(QUICKSTART, ["train.seed=7", "model.class_dropout_prob=0.3", *overrides])


def micro_batch(step: int, index: list[int], x: torch.Tensor, y: torch.Tensor) -> dict:
    return {"x": x, "y": y, "index": torch.tensor(index), "step": step}


@pytest.mark.parametrize("timestep_sampling", ["uniform", "logit_normal"])
def test_draws_depend_on_global_index_not_on_layout(timestep_sampling):
    cfg = cfg_for_draws(f"diffusion.timestep_sampling={timestep_sampling}")
    objective = build_diffusion(cfg)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    whole = draw_training_inputs(micro_batch(5, list(range(8)), x, y), cfg, objective, 10, torch.device("cpu"))
    # 2 ranks x 2 accumulation steps, micro-batch 2: index (accum * world + rank) * mb + j
    parts = {}
    for accum in range(2):
        for rank in range(2):
            idx = [(accum * 2 + rank) * 2 + j for j in range(2)]
            parts.update({i: v for i, v in zip(idx, zip(*[
                getattr(draw_training_inputs(micro_batch(5, idx, x[idx], y[idx]), cfg, objective, 10,
                                             torch.device("cpu")), f) for f in ("y", "t", "noise")]))})
    for i in range(8):
        assert parts[i][0] == whole.y[i] and parts[i][1] == whole.t[i] and torch.equal(parts[i][2], whole.noise[i])
    other_step = draw_training_inputs(micro_batch(6, list(range(8)), x, y), cfg, objective, 10, torch.device("cpu"))
    assert not torch.equal(other_step.noise, whole.noise)


def test_label_dropout_rate_and_null_class():
    cfg = cfg_for_draws()
    objective = build_diffusion(cfg)
    n = 4000
    batch = micro_batch(0, list(range(n)), torch.zeros(n, 1, 2, 2), torch.full((n,), 3))
    y = draw_training_inputs(batch, cfg, objective, 10, torch.device("cpu")).y
    assert set(y.unique().tolist()) == {3, 10}
    assert abs((y == 10).float().mean().item() - 0.3) < 0.03


# ------------------------------------------------------------------------------------ metrics

def test_interval_meter_means_and_skipped_steps():
    meter = IntervalMeter(torch.device("cpu"), global_batch=4, tokens_per_sample=16, flops_per_sample=1e9, world_size=1)
    meter.begin_step()
    meter.add_micro_batch(torch.tensor([1.0, 3.0]), torch.tensor([0.05, 0.95]), torch.tensor(0.5))
    meter.add_micro_batch(torch.tensor([2.0, 2.0]), torch.tensor([0.06, 0.5]), torch.tensor(0.0))
    meter.end_step(True, 2.0)
    meter.begin_step()
    meter.add_micro_batch(torch.tensor([float("nan"), 1.0]), torch.tensor([0.1, 0.2]), torch.tensor(0.0))
    meter.end_step(False, float("inf"))
    out = meter.reduce(identity_sum)
    assert out["diffusion_loss"] == pytest.approx(2.0) and out["aux_loss"] == pytest.approx(0.25)
    assert out["loss"] == pytest.approx(2.25) and out["grad_norm"] == 2.0
    assert out["nonfinite_steps"] == 1 and out["nonfinite_steps_total"] == 1
    assert out["loss_by_t/0.0-0.1"] == pytest.approx(1.5)  # t = 0.05, 0.06
    assert out["loss_by_t/0.9-1.0"] == pytest.approx(3.0) and out["loss_by_t/0.5-0.6"] == pytest.approx(2.0)
    assert sum(k.startswith("loss_by_t/") for k in out) == 3 < TIME_BUCKETS
    assert out["tokens_per_sec"] == pytest.approx(16 * out["samples_per_sec"])
    assert meter.reduce(identity_sum)["nonfinite_steps"] == 0  # a new interval


# ------------------------------------------------------------------------------------ monitor

def test_monitor_writes_jsonl_and_tensorboard(tmp_path):
    monitor = Monitor(tmp_path, enabled=True, max_steps=10, start_step=0, global_batch=4, progress=False)
    monitor.log(5, {"loss": 0.5, "moe/layer1/tokens": torch.tensor([1.0, 2.0]),
                    "moe/layer1/load_by_t": torch.arange(6.0).reshape(2, 3), "bad": float("nan")})
    monitor.log(10, {"eval/class_acc": 0.9})
    monitor.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0] == {"step": 5, "loss": 0.5, "moe/layer1/tokens": [1.0, 2.0],
                          "moe/layer1/load_by_t": [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], "bad": None}
    assert records[1] == {"step": 10, "eval/class_acc": 0.9}
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    # a run resumed from step 5 forgets what an earlier attempt logged after step 5
    Monitor(tmp_path, enabled=True, max_steps=10, start_step=5, global_batch=4, progress=False).close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [5]


def test_disabled_monitor_writes_nothing(tmp_path):
    monitor = Monitor(tmp_path, enabled=False, max_steps=10, start_step=0, global_batch=4)
    monitor.log(1, {"loss": 1.0})
    monitor.close()
    assert not list(tmp_path.iterdir())


def test_heatmap_image_maps_min_and_max_to_the_colormap_ends():
    img = heatmap_image(torch.tensor([[0.0, 1.0]]), cell=2)
    assert img.shape == (2, 4, 3) and img.dtype == np.uint8
    assert img[0, 0].tolist() == [68, 1, 84] and img[0, 3].tolist() == [253, 231, 37]


# ----------------------------------------------------------------------------------- sampling

def tiny_dit(objective: str = "flow"):
    extra = ["diffusion.objective=ddpm", "diffusion.sampler=ddpm", "eval.sample_steps=4",
             "diffusion.sample_steps=4", "diffusion.num_timesteps=100"] if objective == "ddpm" else []
    cfg = load_config(QUICKSTART, ["model.depth=2", "model.hidden_size=32", "model.num_heads=2",
                                   "model.moe.routing=dense", *extra])
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return cfg, model, build_diffusion(cfg)


@pytest.mark.parametrize("objective, sampler", [("flow", "euler"), ("ddpm", "ddpm")])
def test_generate_image_depends_only_on_its_seed(objective, sampler):
    cfg, model, diffusion = tiny_dit(objective)
    y, seeds = torch.tensor([1, 2, 3]), torch.tensor([11, 12, 13])
    together = generate(model, diffusion, y, seeds, 2.0, 4, sampler)
    alone = generate(model, diffusion, y[1:2], seeds[1:2], 2.0, 4, sampler)
    reordered = generate(model, diffusion, y.flip(0), seeds.flip(0), 2.0, 4, sampler)
    assert together.shape == (3, 1, 8, 8) and model.training
    torch.testing.assert_close(alone[0], together[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reordered.flip(0), together, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(together[0], together[1])


def test_grid_layout_and_png(tmp_path):
    labels, seeds, nrow = grid_labels_and_seeds(10)
    assert labels.tolist()[:9] == [0] * 8 + [1] and len(seeds) == 80 and len(set(seeds.tolist())) == 80
    assert grid_labels_and_seeds(1000)[0].unique().tolist() == [i * 100 for i in range(10)]
    images = torch.linspace(-1, 1, 5 * 64).reshape(5, 1, 8, 8)
    grid = save_grid(images, tmp_path / "g.png", nrow=4)
    # 8 px tiles enlarged 4x to 32 px, 2 px padding: 2 rows x 4 columns
    assert grid.shape == (2 * 34 + 2, 4 * 34 + 2, 3)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png")), grid)
    assert grid[2, 2].tolist() == [0, 0, 0] and grid.max() == 255
    with pytest.raises(ValueError, match="decode latents"):
        grid_array(torch.zeros(2, 4, 8, 8))


# ------------------------------------------------------------------------------- batch layout

def test_batch_layout_and_deepspeed_config():
    cfg = load_config(QUICKSTART, ["train.global_batch_size=32"])
    assert batch_layout(cfg, 4) == (8, 1)
    cfg = load_config(QUICKSTART, ["train.global_batch_size=32", "train.micro_batch_size=4"])
    assert batch_layout(cfg, 2) == (4, 4)
    ds = deepspeed_config(cfg, 4, 4, world_size=2)
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (32, 4, 0.0)
    assert ds["zero_optimization"]["stage"] == cfg.parallel.zero_stage and ds["bf16"]["enabled"] is False
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        batch_layout(load_config(QUICKSTART, ["train.global_batch_size=30", "train.micro_batch_size=4"]), 2)
