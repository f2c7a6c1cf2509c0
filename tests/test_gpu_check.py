"""benchmarks/gpu_check.py: its CPU dry run end to end (so the GPU run cannot fail on a typo), and its
reporting pieces against hand-made cases."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.results import RESULTS, update_results

REPO = Path(__file__).resolve().parents[1]


def gpu_block(path: Path) -> str | None:
    found = re.search(r"<!-- begin gpu -->.*?<!-- end gpu -->", path.read_text(), re.S) if path.exists() else None
    return found.group(0) if found else None


def test_dry_run_reports_every_part(tmp_path):
    results = tmp_path / "RESULTS.md"
    committed = gpu_block(RESULTS)
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--results", str(results)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    head = json.loads(proc.stdout.strip().splitlines()[-1])
    assert head["errors"] == {}
    assert head["dry_run"] is True and head["device"] == "CPU" and head["torch"] == torch.__version__
    # (a) syncs per training step, counted: DiffMoE-S at EP=1 trains without one (the DESIGN.md cost model)
    assert isinstance(head["syncs"], (int, float))
    assert head["syncs"] == 0, head["sync_sites"]
    assert head["goals_met"]["zero_syncs"] is True
    # (b) bf16 against fp32: a real difference (bf16 did run), within the printed tolerances
    assert 0 < head["bf16_output_rel_err"] <= head["bf16_tolerances"]["output"]
    assert 0 < head["bf16_grad_rel_err"] <= head["bf16_tolerances"]["grads"]
    # (c) every width, DeepSpeed's case measured where it is installed
    assert set(head["layer_ratios"]) == {"S", "B", "L"}
    measured_deepspeed = [r["deepspeed_top1_vs_dense"] is not None for r in head["layer_ratios"].values()]
    assert measured_deepspeed == [importlib.util.find_spec("deepspeed") is not None] * 3
    for ratios in head["layer_ratios"].values():
        assert ratios["diffmoe_vs_dense"] > 0 and ratios["diffmoe_vs_flop_matched_dense"] > 0
    assert head["goals_met"]["layer_le_1.15x_flop_matched"] == all(
        r["diffmoe_vs_flop_matched_dense"] <= gpu_check.GOAL for r in head["layer_ratios"].values())
    # (d) the ratio and MFU follow from the reported step times and counted FLOPs (4 significant digits)
    ms = head["step_ms"]
    assert head["step_ratio"] == pytest.approx(ms["DiffMoE-S-E16"] / ms["Dense-DiT-S"], rel=2e-3)
    for name in ("DiffMoE-S-E16", "Dense-DiT-S"):
        assert head["tflop_per_step"][name] > 0
        mfu = head["tflop_per_step"][name] / (ms[name] / 1e3) / head["peak_tflops"]
        assert head["mfu"][name] == pytest.approx(mfu, rel=3e-3)
        assert head["peak_memory_gb"][name] is None  # CPU: no CUDA allocator to ask
    text = results.read_text()
    assert "## gpu" in text and "Dry run" in text and "failed" not in text
    assert all(heading in text for _, heading, _ in gpu_check.PARTS)
    assert gpu_block(RESULTS) == committed  # a dry run leaves benchmarks/RESULTS.md alone


def two_syncs_per_step() -> None:
    x = torch.arange(6)
    x.tolist()
    torch.nonzero(x)


def test_sync_counter_counts_each_syncing_call():
    counted = gpu_check.counted_syncs(two_syncs_per_step, steps=3)
    assert counted["syncs_per_step"] == 2


def raise_here() -> None:
    raise RuntimeError(gpu_check.SYNC_MESSAGE)


def test_first_sync_site_names_the_innermost_project_frame():
    try:
        raise_here()
    except RuntimeError as e:
        where = gpu_check.first_sync_site(e)
    line = raise_here.__code__.co_firstlineno + 1
    assert where == f"tests/test_gpu_check.py:{line} in raise_here: raise RuntimeError(gpu_check.SYNC_MESSAGE)"


def test_relative_error_closed_form():
    ref = torch.tensor([3.0, 4.0])
    assert gpu_check.relative_error(ref * 1.1, ref) == pytest.approx(0.1)
    assert gpu_check.relative_error(torch.zeros(2), torch.zeros(2)) == 0.0


def test_a_failing_part_is_reported_and_the_others_still_run(tmp_path):
    settings = gpu_check.Settings(dry_run=True, device=torch.device("cpu"), dtype=torch.float32,
                                  results=tmp_path / "RESULTS.md")

    def broken(s):
        raise RuntimeError("boom")

    def fine(s):
        return "the steps ran", {"step_ratio": 1.1}

    head = gpu_check.run_parts(settings, [("syncs", "(a) syncs", broken), ("steps", "(d) steps", fine)])
    assert head["errors"] == {"syncs": "RuntimeError: boom"}
    assert head["goals_met"] == {"layer_le_1.15x_flop_matched": None, "step_le_1.15x_dense": True, "zero_syncs": None}
    text = settings.results.read_text()
    assert "**(a) syncs**" in text and "**failed**: `RuntimeError: boom`" in text and "the steps ran" in text


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", None)])
def test_peak_flops_by_device_name(name, peak):
    assert gpu_check.peak_tflops(name, None, dry_run=False)[0] == peak
    assert gpu_check.peak_tflops(name, 500.0, dry_run=False)[0] == 500.0


def test_from_device_copies_the_section_and_keeps_the_others(tmp_path):
    device_run, local = tmp_path / "device.md", tmp_path / "RESULTS.md"
    update_results("gpu", "figures from the device", path=device_run)
    update_results("data", "the data section", path=local)
    update_results("gpu", "an older gpu section", path=local)
    assert gpu_check.main(["--from-device", str(device_run), "--results", str(local)]) == 0
    assert gpu_block(local) == gpu_block(device_run)
    assert "the data section" in local.read_text() and "an older gpu section" not in local.read_text()
