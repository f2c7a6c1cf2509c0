"""benchmarks/compute_knob.py: the measured activated params against the configs' nominal counts,
the equal-params comparison against hand-computed curves, the quickstart-run reuse rule, and the
shared training-run marker (benchmarks/train_runs.py)."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks.compute_knob import (CONFIG, Point, compare, fid_at, measure, params_to_reach, quickstart_matches,
                                     train_overrides)
from benchmarks.train_runs import TRAINED, resolved_config, same_config, train_run
from engine.config import load_config, save_config
from engine.digits_eval import ReferenceClassifier, eval_labels_and_seeds, heldout_pixel_statistics
from engine.params import count_params
from models import build_model, moe


def nominal(capacity: float) -> float:
    """engine.params' activated count of the quickstart at `capacity` experts per token."""
    return count_params(load_config(str(CONFIG), [f"model.moe.capacity={capacity}"]))[2]


@pytest.fixture(scope="module")
def quickstart():
    torch.manual_seed(0)
    cfg = load_config(str(CONFIG), [])
    return cfg, build_model(cfg).eval()


def model_inputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8 images (x, t, y): 8 x 16 tokens, so every k = 128 / 4 * capacity below is whole."""
    x = torch.randn(8, model.in_channels, model.input_size, model.input_size, generator=torch.Generator().manual_seed(0))
    return x, torch.full((8,), 0.5), torch.arange(8) % 10


@pytest.mark.parametrize("capacity", [0.25, 1.0, 2.0])
def test_static_capacity_measures_the_nominal_params_of_that_capacity(quickstart, capacity):
    cfg, model = quickstart
    moe.set_inference(model, "static", capacity=capacity)
    moe.reset_meters(model)
    with torch.no_grad():
        model(*model_inputs(model))
    assert moe.average_activated_params(model) == pytest.approx(nominal(capacity))


def test_dynamic_extreme_shifts_measure_no_expert_and_every_expert(quickstart):
    cfg, model = quickstart
    no_expert = 2 * nominal(1.0) - nominal(2.0)  # activated params are linear in experts per token
    for shift, expected in ((2.0, no_expert), (-2.0, nominal(float(cfg.model.moe.num_experts)))):
        moe.set_inference(model, "dynamic", threshold_shift=shift)  # probabilities lie in (0, 1)
        moe.reset_meters(model)
        with torch.no_grad():
            model(*model_inputs(model))
        assert moe.average_activated_params(model) == pytest.approx(expected), shift


def test_measure_reports_the_static_points_nominal_params_and_valid_scores(quickstart):
    cfg, model = quickstart
    labels, seeds = eval_labels_and_seeds(20)  # one batch of 20 (x2 with guidance) images: k whole at 0.5
    result = measure(model, cfg, Point("static", 0.5), labels, seeds, 2, ReferenceClassifier.fit(cfg),
                     heldout_pixel_statistics(cfg.model.input_size))
    assert result["activated_params"] == pytest.approx(nominal(0.5))
    assert 0.0 <= result["class_acc"] <= 1.0 and result["fid"] > 0


def curve(*points: tuple[float, float]) -> list[dict[str, float]]:
    return [{"activated_params": p, "fid": f} for p, f in points]


def test_fid_at_interpolates_linearly_inside_the_sweep_only():
    c = curve((30.0, 1.0), (10.0, 3.0), (20.0, 2.0))  # unsorted on purpose
    assert fid_at(c, 15.0) == pytest.approx(2.5)
    assert fid_at(c, 30.0) == pytest.approx(1.0)
    assert fid_at(c, 9.0) is None and fid_at(c, 31.0) is None


def test_params_to_reach_finds_the_first_crossing():
    c = curve((10.0, 4.0), (20.0, 2.0), (30.0, 1.0))
    assert params_to_reach(c, 3.0) == pytest.approx(15.0)  # halfway from 4 to 2
    assert params_to_reach(c, 5.0) == pytest.approx(10.0)  # already at the first point
    assert params_to_reach(c, 0.5) is None


def test_compare_static_reference_against_dynamic_at_equal_params():
    points = [Point("static", 0.5), Point("static", 1.0), Point("static", 2.0),
              Point("dynamic", 0.1), Point("dynamic", 0.0)]
    results = curve((10.0, 3.0), (20.0, 2.0), (40.0, 1.5)) + curve((15.0, 2.0), (25.0, 1.0))
    got = compare(points, results)
    assert got["static_params"] == 20.0 and got["static_fid"] == 2.0
    assert got["dynamic_fid_at_static_params"] == pytest.approx(1.5)  # halfway from 2.0 to 1.0
    assert got["dynamic_params_for_static_fid"] == pytest.approx(15.0)  # its first point already has FID 2
    assert got["static_params_for_static_fid"] == pytest.approx(20.0)  # 3.0 at 10 -> 2.0 at 20
    assert got["lowest_dynamic_params"] == 15.0
    # static at 15 is 2.5, at 25 is 1.875: gaps -0.5 and -0.875
    assert got["mean_fid_gap_at_equal_params"] == pytest.approx((-0.5 - 0.875) / 2)


def test_quickstart_run_is_reused_only_when_finished_with_the_same_model(tmp_path):
    want = resolved_config(CONFIG, train_overrides(0, tmp_path / "unused"))
    run = tmp_path / "quickstart"
    run.mkdir()
    save_config(load_config(str(CONFIG), []), run / "config.yaml")
    max_steps = want["train"]["max_steps"]
    (run / "metrics.jsonl").write_text(json.dumps({"step": max_steps - 50}) + "\n")
    assert not quickstart_matches(run, want)  # not finished
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": max_steps}) + "\n")
    assert quickstart_matches(run, want)
    save_config(load_config(str(CONFIG), ["model.moe.capacity=2.0"]), run / "config.yaml")
    assert not quickstart_matches(run, want)


def test_train_run_keeps_a_finished_run_of_the_same_resolved_config(tmp_path):
    run = tmp_path / "run"
    overrides = train_overrides(0, run)
    run.mkdir()
    (run / TRAINED).write_text(json.dumps({"config": resolved_config(CONFIG, overrides), "seconds": 12.5}))
    assert train_run(run, CONFIG, overrides) == 12.5  # kept: no training subprocess
    with pytest.raises(ValueError, match="train.output_dir"):
        train_run(run, CONFIG, train_overrides(0, tmp_path / "elsewhere"))


def test_a_stored_config_stays_the_same_run_through_new_keys_but_not_changed_values(tmp_path):
    overrides = train_overrides(0, tmp_path / "run")
    stored = resolved_config(CONFIG, overrides)
    del stored["model"]["moe"]["threshold_shift"]  # a key added later: read at its default
    assert same_config(stored, CONFIG, overrides)
    stored["model"]["moe"]["capacity"] = 2.0
    assert not same_config(stored, CONFIG, overrides)
    assert not same_config({"model": {"no_such_key": 1}}, CONFIG, overrides)
