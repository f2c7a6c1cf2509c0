"""`python -m engine.params`: parameter counts of the papers' tables (REFERENCE.md) within 1%."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import load_config
from engine.params import count_params

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "imagenet256"
MI = 2**20


@pytest.mark.parametrize("name, overrides, total, activated", [
    # DiffMoE table (learned-sigma DiT counts): total includes the capacity predictor, activated not
    ("diffmoe_s_e16_flow", ["model.learn_sigma=true", "diffusion.objective=ddpm", "diffusion.sampler=ddpm"], 140.27e6, 33.00e6),
    ("diffmoe_l_e8_ddpm", [], 1175.97e6, 458.20e6),
    ("diffmoe_xl_e8_flow", [], 1735.00e6, 675.26e6),
    ("dense_dit_xl_ddpm", [], 675.13e6, 675.13e6),
    # the recipe's README: totals in 1e6, active parameters in 2^20 units
    ("recipe_s_e16_flow", [], 97e6, 33 * MI),
    ("recipe_l_e48_flow", [], 1.17e9, 436 * MI),
])
def test_counts_match_the_papers(name, overrides, total, activated):
    _, got_total, got_activated = count_params(load_config(CONFIGS / f"{name}.yaml", overrides))
    assert got_total == pytest.approx(total, rel=0.01)
    assert got_activated == pytest.approx(activated, rel=0.01)


def test_cli_breakdown_and_json_last_line():
    out = subprocess.run([sys.executable, "-m", "engine.params", str(CONFIGS / "diffmoe_s_e16_flow.yaml"),
                          "model.moe.num_experts=8"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert any(line.strip().startswith("predictor") for line in lines)
    assert any(line.strip().startswith("experts") for line in lines)
    counts = json.loads(lines[-1])
    assert set(counts) == {"total", "activated"} and counts["total"] > counts["activated"] > 0


def test_cli_config_error_names_the_key():
    run = subprocess.run([sys.executable, "-m", "engine.params", str(CONFIGS / "diffmoe_s_e16_flow.yaml"),
                          "model.moe.router=sigmoid_bias"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "model.moe.router" in run.stderr


def test_every_imagenet_config_loads():
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.name == path.stem
