"""`python -m engine.export`: the EMA of every expert of every expert-parallel shard, as the state dict
of the model at ep_size 1, loadable by a plain torch process (no DeepSpeed)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from engine.config import load_config
from engine.export import load_model_for_inference
from models import build_model
from tests.checkpoint_utils import TINY_MOE, build_engine, train_step
from tests.dist_utils import run_distributed
from tests.train_utils import REPO, child_env

pytestmark = pytest.mark.slow

EXPERT_KEYS = tuple(f"blocks.1.ffn.experts.{w}" for w in ("w1", "b1", "w2", "b2"))


def _train_and_save(run: str) -> dict[str, torch.Tensor]:
    from parallel.checkpoint import save_checkpoint

    cfg, engine, ema = build_engine(["parallel.ep_size=2", f"train.output_dir={run}"])
    for step in (1, 2):
        train_step(engine, ema, step)
    save_checkpoint(Path(run) / "checkpoints", 2, engine, ema, {"step": 2}, cfg)
    return {k: v.cpu().clone() for k, v in ema.state_dict().items()}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    emas = run_distributed(_train_and_save, 2, str(run))
    return run, emas


def _export(run: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.export", "--run", str(run), "--out", str(out), *extra],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)


def test_export_holds_every_expert_and_exactly_the_parameters(saved_run, tmp_path):
    run, emas = saved_run
    out = tmp_path / "model.safetensors"
    proc = _export(run, out)
    assert proc.returncode == 0, proc.stderr
    state = safetensors.torch.load_file(str(out))
    with safetensors.safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "diffmoe-ema-weights" and meta["step"] == "2"

    model = build_model(load_config(None, TINY_MOE))  # ep_size 1: all 4 experts
    params = dict(model.named_parameters())
    assert set(state) == set(model.state_dict())
    assert sum(state[n].numel() for n in params) == sum(p.numel() for p in model.parameters())
    assert set(state) - set(params) == {"blocks.1.ffn.predictor.threshold"}  # the one persistent buffer
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in proc.stdout

    for name in params:
        if name in EXPERT_KEYS:  # rank 0 held experts 0-1, rank 1 experts 2-3
            assert torch.equal(state[name], torch.cat([emas[0][name], emas[1][name]])), name
        else:
            assert torch.equal(state[name], emas[0][name]) and torch.equal(state[name], emas[1][name]), name


def test_plain_torch_process_loads_the_export(saved_run, tmp_path):
    run, _ = saved_run
    out = tmp_path / "model.safetensors"
    assert _export(run, out, "--step", "2").returncode == 0
    probe = (
        "import sys, torch\n"
        "from engine.export import load_model_for_inference\n"
        f"cfg, model = load_model_for_inference(weights={str(out)!r})\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x, t, y = torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, generator=g), torch.tensor([1, 3])\n"
        "with torch.no_grad():\n"
        "    torch.save(model(x, t, y), sys.argv[1])\n"
        "assert 'deepspeed' not in sys.modules and cfg.parallel.ep_size == 1\n"
    )
    result = tmp_path / "out.pt"
    proc = subprocess.run([sys.executable, "-c", probe, str(result)], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr

    cfg, model = load_model_for_inference(run=run)  # straight from the checkpoint folder
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, generator=g), torch.tensor([1, 3])
    with torch.no_grad():
        expected = model(x, t, y)
    assert expected.abs().sum() > 0
    assert torch.equal(torch.load(result), expected)


def test_export_errors_name_the_problem(saved_run, tmp_path):
    run, _ = saved_run
    proc = _export(run, tmp_path / "x.safetensors", "--step", "7")
    assert proc.returncode == 2 and "step_0000007" in proc.stderr and "[2]" in proc.stderr
    proc = _export(tmp_path / "nowhere", tmp_path / "x.safetensors")
    assert proc.returncode == 2 and "no checkpoint in" in proc.stderr
