"""The GPU check of the MoE hot path: one command on one H100/H200 (<= 8 minutes), or a dry run on CPU.

    python benchmarks/gpu_check.py              # CUDA: writes the `gpu` section of benchmarks/RESULTS.md
    python benchmarks/gpu_check.py --dry-run    # tiny sizes on CPU (CI): same code paths, results to a temp file
    python benchmarks/gpu_check.py --from-device OUT/RESULTS.md   # copy a device run's `gpu` section here

Four parts, each reported on its own (a part that fails is reported as failed; the others still run,
and the section is rewritten after every part, so what finished is kept even if a later part hangs):
  (a) syncs: DiffMoE-S-E16 (configs/imagenet256/diffmoe_s_e16_flow.yaml at EP=1: one process, the
      micro-batch pool) trains a few bf16 steps (forward, backward, fused AdamW) under
      torch.cuda.set_sync_debug_mode("error"); on a sync, the first offending op is reported and the
      steps rerun under "warn" to count them. On CPU, benchmarks.host_syncs's TorchFunctionMode counter
      counts the calls that would sync on CUDA (on CUDA it runs too, as a check of that counter).
  (b) precision: the same model's output and parameter gradients in bf16 against fp32 (TF32 off),
      relative errors ||low - ref|| / ||ref|| against printed tolerances.
  (c) layers: one MoE layer's forward + backward at S/B/L widths, E16, 8192 tokens, bf16: DiffMoE vs
      the dense FFN of equal activated FLOPs vs the FLOP-matched dense FFN vs DeepSpeed's MoE top-1
      (benchmarks/moe_layer.py's cases), CUDA-event timed in interleaved rounds after warm-up.
  (d) steps: a DiffMoE-S-E16 train step vs a Dense-DiT-S one at the same global batch (synthetic
      32x32x4 latents): time ratio, peak memory (torch.cuda.max_memory_allocated), MFU (FLOPs of one
      step counted by FlopCounterMode / the bf16 dense peak of the device).
Goals: DiffMoE layer <= 1.15x the FLOP-matched dense at every width; DiffMoE-S step <= 1.15x Dense-S;
0 syncs. The last stdout line is JSON of the headline; the exit code is 1 when a part failed.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks.host_syncs import SyncCounter  # noqa: E402
from benchmarks.moe_layer import FLOP_MATCHED, count_flops, deepspeed_cases, iteration, our_cases  # noqa: E402
from benchmarks.results import RESULTS, copy_section, update_results  # noqa: E402
from engine.config import Config, load_config  # noqa: E402
from engine.train_step import TrainingInputs  # noqa: E402
from models import build_model, moe  # noqa: E402
from models.diffusion import build_diffusion  # noqa: E402
from models.diffusion.flow import RectifiedFlow  # noqa: E402

CONFIGS = {"DiffMoE-S-E16": REPO / "configs/imagenet256/diffmoe_s_e16_flow.yaml",
           "Dense-DiT-S": REPO / "configs/imagenet256/dense_dit_s_flow.yaml"}
GOAL = 1.15  # DiffMoE layer / FLOP-matched dense, DiffMoE-S step / Dense-S step
# dense (no sparsity) bf16 tensor-core peaks, TFLOPS; the first name contained in the device's name wins
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0))
DENSE = "dense FFN 4d"  # the dense FFN of equal activated FLOPs
DEEPSPEED = "deepspeed top-1"
LAYER_CASES = (DENSE, FLOP_MATCHED, "diffmoe")
SYNC_MESSAGE = "synchronizing CUDA operation"  # torch's text for a sync under set_sync_debug_mode
# bf16 keeps 8 mantissa bits (relative rounding 2^-9 per value). Measured on CPU at DiffMoE-S, 8 samples:
# output 9.4e-3, all gradients 3.9e-3 (the router's alone 0.2: expert choice moves a few near-tie
# tokens to other experts); the tolerances leave ~3x for GPU kernels (flash attention, cuBLAS splits)
TOLERANCES = {"output": 0.03, "grads": 0.015}


@dataclass
class Settings:
    dry_run: bool
    device: torch.device
    dtype: torch.dtype
    results: Path
    overrides: list[str] = field(default_factory=lambda: ["parallel.ep_size=1"])
    precision_batch: int = 8  # 2048 tokens
    sync_steps: int = 3
    widths: dict[str, int] = field(default_factory=lambda: {"S": 384, "B": 768, "L": 1024})
    experts: int = 16
    layer_samples: int = 32  # x 256 tokens = 8192
    tokens_per_sample: int = 256
    warmup: int = 3
    layer_iters: int = 10  # iterations per timed region
    layer_rounds: int = 7
    step_iters: int = 10
    peak_tflops: float | None = None
    peak_source: str = ""


def make_settings(args: argparse.Namespace) -> Settings:
    if args.dry_run:
        # tiny but complete: 2 blocks (one MoE), E4, 16 tokens per sample; bf16 where the CPU has it
        s = Settings(dry_run=True, device=torch.device("cpu"), dtype=torch.bfloat16,
                     results=args.results or Path(tempfile.gettempdir()) / "gpu_check_dry_run_RESULTS.md",
                     overrides=["parallel.ep_size=1", "model.depth=2", "model.hidden_size=32", "model.num_heads=2",
                                "model.input_size=8", "model.moe.num_experts=4", "train.global_batch_size=4"],
                     precision_batch=2, sync_steps=2, widths={"S": 32, "B": 48, "L": 64}, experts=4, layer_samples=4,
                     tokens_per_sample=16, warmup=1, layer_iters=2, layer_rounds=2, step_iters=2)
    else:
        s = Settings(dry_run=False, device=torch.device("cuda"), dtype=torch.bfloat16, results=args.results or RESULTS)
    s.peak_tflops, s.peak_source = peak_tflops(device_name(s.device), args.peak_tflops, s.dry_run)
    return s


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def peak_tflops(name: str, given: float | None, dry_run: bool) -> tuple[float | None, str]:
    """The bf16 dense peak MFU divides by, and where it comes from (None: MFU not reported)."""
    if given is not None:
        return given, "--peak-tflops"
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"{key} bf16 dense peak"
    if dry_run:
        return 1.0, "nominal 1 TFLOPS (dry run: exercises the arithmetic only)"
    return None, f"unknown for {name} (pass --peak-tflops)"


# ---------------------------------------------------------------------------------------------- shared
def load(model: str, s: Settings) -> Config:
    return load_config(CONFIGS[model], s.overrides)


def trainable(cfg: Config, s: Settings) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The config's DiT in the check's dtype (as DeepSpeed bf16 casts it) and a fused AdamW over it."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg).to(s.device, s.dtype).train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=cfg.train.lr, betas=cfg.train.betas, fused=True)


def synthetic_inputs(cfg: Config, batch: int, device: torch.device) -> TrainingInputs:
    """Latent-shaped data ([B, C, H, W] from model.in_channels / input_size), labels, times and noise."""
    g = torch.Generator().manual_seed(0)
    shape = (batch, cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    drawn = (torch.randn(shape, generator=g), torch.randint(0, cfg.model.num_classes, (batch,), generator=g),
             torch.rand(batch, generator=g), torch.randn(shape, generator=g))
    return TrainingInputs(*(v.to(device) for v in drawn))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, objective: RectifiedFlow,
               inputs: TrainingInputs) -> None:
    """engine/train_step.py's loss (diffusion + MoE aux) without its logging reads, then the update."""
    dtype = next(model.parameters()).dtype
    optimizer.zero_grad(set_to_none=True)
    per_sample = objective.training_losses(lambda x_t, t: model(x_t.to(dtype), t, inputs.y).float(),
                                           inputs.x0, inputs.t, inputs.noise)
    (per_sample.mean() + moe.collect_aux_loss(model)).backward()
    optimizer.step()


class Stopwatch:
    """Device time of a region: CUDA events on the current stream (no host wait inside the region;
    `seconds` waits for the end event afterwards), the wall clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> float:
        """Between the first and the last mark."""
        first, last = self.marks[0], self.marks[-1]
        if self.cuda:
            last.synchronize()
            return first.elapsed_time(last) / 1e3
        return last - first


def timed(fn: Callable[[], None], iters: int, device: torch.device) -> Stopwatch:
    watch = Stopwatch(device)
    watch.mark()
    for _ in range(iters):
        fn()
    watch.mark()
    return watch


def relative_error(low: torch.Tensor, ref: torch.Tensor) -> float:
    """||low - ref|| / ||ref|| in fp32 (0 when both are 0)."""
    diff, norm = (low.float() - ref.float()).norm().item(), ref.float().norm().item()
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


def site(filename: str, lineno: int | None, name: str = "", line: str | None = "") -> str:
    path = Path(filename)
    with contextlib.suppress(ValueError):
        path = path.resolve().relative_to(REPO)
    return f"{path}:{lineno}" + (f" in {name}" if name else "") + (f": {line.strip()}" if line else "")


def first_sync_site(error: BaseException) -> str:
    """The innermost frame of this repository outside this file (the call that synced), else the innermost."""
    frames = traceback.extract_tb(error.__traceback__)
    here = Path(__file__).resolve()
    ours = [f for f in frames if Path(f.filename).resolve().is_relative_to(REPO) and Path(f.filename).resolve() != here]
    f = (ours or frames)[-1]  # a sync in backward: torch's autograd frame, below the .backward() call
    return site(f.filename, f.lineno, f.name, f.line)


@contextlib.contextmanager
def sync_debug_mode(mode: str) -> Iterator[None]:
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def cuda_syncs(step: Callable[[], None], steps: int) -> dict:
    """Steps under set_sync_debug_mode("error"); on a sync, its site, then a rerun under "warn" that
    counts every sync and where (the Python line each warning is attributed to)."""
    torch.cuda.synchronize()
    try:
        with sync_debug_mode("error"):
            for _ in range(steps):
                step()
        return {"syncs_per_step": 0, "first_sync": None, "sites": {}}
    except RuntimeError as e:
        if SYNC_MESSAGE not in str(e):
            raise
        first = first_sync_site(e)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught, sync_debug_mode("warn"):
        warnings.simplefilter("always")
        for _ in range(steps):
            step()
    sites: dict[str, int] = {}
    for w in caught:
        if SYNC_MESSAGE in str(w.message):
            key = site(w.filename, w.lineno)
            sites[key] = sites.get(key, 0) + 1
    return {"syncs_per_step": sum(sites.values()) / steps, "first_sync": first, "sites": sites}


def counted_syncs(step: Callable[[], None], steps: int) -> dict:
    """The calls that sync on CUDA, counted by benchmarks/host_syncs.py's TorchFunctionMode counter."""
    with SyncCounter() as counter:
        for _ in range(steps):
            step()
    return {"syncs_per_step": counter.count / steps, "sites": dict(counter.by_op)}


# ---------------------------------------------------------------------------------------------- parts
def part_syncs(s: Settings) -> tuple[str, dict]:
    """(a) host syncs of DiffMoE-S-E16 training steps at EP=1."""
    cfg = load("DiffMoE-S-E16", s)
    model, optimizer = trainable(cfg, s)
    inputs = synthetic_inputs(cfg, cfg.train.global_batch_size, s.device)
    step = partial(train_step, model, optimizer, build_diffusion(cfg), inputs)
    for _ in range(s.warmup):  # one-time work (kernel probes, optimizer state) is not a per-step sync
        step()
    counted = counted_syncs(step, s.sync_steps)
    found = cuda_syncs(step, s.sync_steps) if s.device.type == "cuda" else counted
    how = ('torch.cuda.set_sync_debug_mode("error")' if s.device.type == "cuda"
           else "the TorchFunctionMode counter of benchmarks/host_syncs.py (CPU: no CUDA to ask)")
    syncs = found["syncs_per_step"]
    lines = [f"DiffMoE-S-E16 at EP=1 (micro-batch pool), {cfg.train.global_batch_size} samples per step, "
             f"{s.sync_steps} training steps (forward, backward, fused AdamW) after {s.warmup} warm-up, checked by {how}: "
             f"**{syncs:g} host syncs per step** (goal 0)."]
    if found.get("first_sync"):
        lines.append(f"First offending op: `{found['first_sync']}`.")
    if found["sites"]:
        lines.append("Where: " + ", ".join(f"`{k}` x{v}" for k, v in found["sites"].items()) + ".")
    if s.device.type == "cuda":
        lines.append(f"The CPU counter (benchmarks/host_syncs.py) counts {counted['syncs_per_step']:g} per step in the "
                     "same steps" + (f": {counted['sites']}." if counted["sites"] else "."))
    return " ".join(lines), {"syncs": syncs, "syncs_counted": counted["syncs_per_step"],
                             "first_sync": found.get("first_sync"), "sync_sites": found["sites"]}


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """fp32 matmuls and convolutions without TF32 (the reference of the bf16 check)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def output_and_grads(model: torch.nn.Module, inputs: TrainingInputs, cotangent: torch.Tensor
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's output on the flow interpolant and the gradients of <output, cotangent> + MoE aux."""
    dtype = next(model.parameters()).dtype
    x_t = RectifiedFlow.interpolate(inputs.x0, inputs.t, inputs.noise)
    out = model(x_t.to(dtype), inputs.t, inputs.y).float()
    ((out * cotangent).sum() / cotangent.numel() + moe.collect_aux_loss(model)).backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def part_precision(s: Settings) -> tuple[str, dict]:
    """(b) bf16 forward/backward of DiffMoE-S against fp32."""
    cfg = load("DiffMoE-S-E16", s)
    torch.manual_seed(0)
    reference = build_model(cfg).to(s.device).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # adaLN-Zero starts every block as the identity and the output at 0: give those weights values
        for p in reference.parameters():
            if p.requires_grad and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    low = copy.deepcopy(reference).to(s.dtype)
    inputs = synthetic_inputs(cfg, s.precision_batch, s.device)
    shape = (s.precision_batch, reference.out_channels, cfg.model.input_size, cfg.model.input_size)
    cotangent = torch.randn(shape, generator=g).to(s.device)
    with full_fp32():
        out_ref, grads_ref = output_and_grads(reference, inputs, cotangent)
    out_low, grads_low = output_and_grads(low, inputs, cotangent)
    if grads_low.keys() != grads_ref.keys():
        raise RuntimeError(f"bf16 and fp32 models have gradients for different parameters: {grads_low.keys() ^ grads_ref.keys()}")
    diff = math.sqrt(sum((grads_low[n].float() - grads_ref[n]).norm().item() ** 2 for n in grads_ref))
    norm = math.sqrt(sum(grads_ref[n].norm().item() ** 2 for n in grads_ref))
    per_tensor = {n: relative_error(grads_low[n], grads_ref[n]) for n in grads_ref}
    worst = max(per_tensor, key=per_tensor.get)
    errors = {"output": relative_error(out_low, out_ref), "grads": diff / norm}
    ok = {k: errors[k] <= TOLERANCES[k] for k in errors}
    rows = [f"| {k} | {errors[k]:.2e} | {TOLERANCES[k]:.0e} | {'yes' if ok[k] else '**no**'} |" for k in errors]
    text = (f"DiffMoE-S-E16, {s.precision_batch} samples, weights initialised then the zero-initialised ones "
            f"(adaLN-Zero, output layer) set to N(0, 0.02); {str(s.dtype).removeprefix('torch.')} vs fp32 (TF32 off) "
            f"on {s.device.type}, relative error ||low - ref|| / ||ref|| of the output and of all parameter gradients "
            "together; the loss is <output, random cotangent> + the MoE aux loss.\n\n"
            "| quantity | relative error | tolerance | within |\n|---|---|---|---|\n" + "\n".join(rows)
            + f"\n\nLargest single-tensor gradient error: `{worst}` {per_tensor[worst]:.2e} (small tensors, e.g. the "
            "router's, move most when a near-tie token changes expert).")
    return text, {"bf16_output_rel_err": errors["output"], "bf16_grad_rel_err": errors["grads"],
                  "bf16_tolerances": TOLERANCES, "bf16_within_tolerance": all(ok.values())}


def time_interleaved(fns: dict[str, Callable[[], None]], s: Settings) -> dict[str, list[float]]:
    """Seconds per call of every fn, `layer_rounds` rounds of `layer_iters` calls each, the fns in
    turn within a round; the host waits only after a round, outside every timed region."""
    for fn in fns.values():
        for _ in range(s.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(s.layer_rounds):
        watches = {name: timed(fn, s.layer_iters, s.device) for name, fn in fns.items()}
        for name, watch in watches.items():
            times[name].append(watch.seconds() / s.layer_iters)
    return times


def part_layers(s: Settings) -> tuple[str, dict]:
    """(c) one MoE layer's forward + backward vs the dense references and DeepSpeed's MoE top-1."""
    sections, ratios, notes = [], {}, []
    tokens = s.layer_samples * s.tokens_per_sample
    for size, d in s.widths.items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(s.layer_samples, s.tokens_per_sample, d, generator=g).to(s.device, s.dtype).requires_grad_()
        c = torch.randn(s.layer_samples, d, generator=g).to(s.device, s.dtype)
        t = torch.rand(s.layer_samples, generator=g).to(s.device)
        grad = torch.randn(s.layer_samples, s.tokens_per_sample, d, generator=g).to(s.device, s.dtype)
        cases = [case for case in our_cases(d, s.experts) if case.name in LAYER_CASES]
        for case in cases:
            case.module.to(s.device, s.dtype).train()
        flops = {case.name: count_flops(case, x, c, t, grad) for case in cases}
        try:  # its first two iterations run here, so a DeepSpeed that fails on this machine drops only its row
            (deepspeed,) = deepspeed_cases(d, s.experts, top_ks=(1,))
            deepspeed.module.to(s.device, s.dtype).train()
            flops[deepspeed.name] = count_flops(deepspeed, x, c, t, grad)
            cases.append(deepspeed)
        except Exception as e:  # noqa: BLE001 - not installed, or failing here: the other cases still run
            note = f"DeepSpeed's MoE not measured ({type(e).__name__}: {e})"
            if note not in notes:
                notes.append(note)
        times = time_interleaved({case.name: partial(iteration, case, x, c, t, grad) for case in cases}, s)

        def ratio(name: str, reference: str) -> float:
            return statistics.median(a / b for a, b in zip(times[name], times[reference]))

        rows = [f"| {case.name} | {statistics.median(times[case.name]) * 1e3:.3f} | **{ratio(case.name, DENSE):.3f}** | "
                f"{ratio(case.name, FLOP_MATCHED):.3f} | {flops[case.name] / flops[DENSE]:.3f} |" for case in cases]
        ratios[size] = {"diffmoe_vs_dense": ratio("diffmoe", DENSE),
                        "diffmoe_vs_flop_matched_dense": ratio("diffmoe", FLOP_MATCHED),
                        "flop_matched_vs_dense": ratio(FLOP_MATCHED, DENSE),
                        "deepspeed_top1_vs_dense": ratio(DEEPSPEED, DENSE) if DEEPSPEED in times else None}
        sections.append(f"**{size}**: d={d}, E={s.experts}, {tokens} tokens ({s.layer_samples} x {s.tokens_per_sample})\n\n"
                        f"| case | median ms | ratio to {DENSE} | ratio to {FLOP_MATCHED} | FLOP ratio to {DENSE} |\n"
                        "|---|---|---|---|---|\n" + "\n".join(rows)
                        + f"\n\ndiffmoe / {FLOP_MATCHED}: **{ratios[size]['diffmoe_vs_flop_matched_dense']:.3f}** (goal <= {GOAL})")
        del cases
    head = (f"One layer's training iteration (forward, backward of a random cotangent + aux loss), "
            f"{str(s.dtype).removeprefix('torch.')}, {s.warmup} warm-up calls, then {s.layer_rounds} interleaved rounds "
            f"of {s.layer_iters} calls per case, {'CUDA events' if s.device.type == 'cuda' else 'wall clock'}; "
            "ratios are medians over rounds of per-round ratios.")
    return "\n\n".join([head, *notes, *sections]), {"layer_ratios": ratios}


def part_steps(s: Settings) -> tuple[str, dict]:
    """(d) DiffMoE-S-E16 vs Dense-DiT-S train step at the same global batch: time, peak memory, MFU."""
    batch = load("DiffMoE-S-E16", s).train.global_batch_size
    measured = {}
    for name in CONFIGS:
        cfg = load(name, s)
        model, optimizer = trainable(cfg, s)
        inputs = synthetic_inputs(cfg, batch, s.device)
        step = partial(train_step, model, optimizer, build_diffusion(cfg), inputs)
        for _ in range(s.warmup):
            step()
        with FlopCounterMode(display=False) as counter:
            step()
        if s.device.type == "cuda":
            torch.cuda.synchronize(s.device)
            torch.cuda.reset_peak_memory_stats(s.device)
        seconds = timed(step, s.step_iters, s.device).seconds() / s.step_iters
        peak = torch.cuda.max_memory_allocated(s.device) / 2**30 if s.device.type == "cuda" else None
        flops = counter.get_total_flops()
        measured[name] = {"ms": seconds * 1e3, "peak_gb": peak, "tflop": flops / 1e12,
                          "analytic_tflop": 3 * model.flops_per_sample() * batch / 1e12,
                          "mfu": flops / seconds / (s.peak_tflops * 1e12) if s.peak_tflops else None}
        del model, optimizer, step
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
    moe_s, dense = measured["DiffMoE-S-E16"], measured["Dense-DiT-S"]
    step_ratio = moe_s["ms"] / dense["ms"]

    def fmt(v: float | None, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    rows = [f"| {name} | {m['ms']:.2f} | {fmt(m['peak_gb'], '.2f')} | {m['tflop']:.4g} | {m['analytic_tflop']:.4g} | "
            f"{m['tflop'] / m['ms'] * 1e3:.4g} | {fmt(m['mfu'], '.2%')} |" for name, m in measured.items()]
    text = (f"One training step (forward, backward, fused AdamW) of {batch} synthetic "
            f"{cfg.model.input_size}x{cfg.model.input_size}x{cfg.model.in_channels} latents "
            f"({s.warmup} warm-up, mean of {s.step_iters} steps); FLOPs counted by FlopCounterMode (every matmul and "
            "attention the step runs, the capacity predictor's included), next to 3x the analytic forward FLOPs; "
            f"MFU against {fmt(s.peak_tflops, 'g')} TFLOPS ({s.peak_source}).\n\n"
            "| model | ms / step | peak memory GiB | TFLOP / step (counted) | TFLOP / step (3x forward) | TFLOPS | MFU |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(rows)
            + f"\n\nDiffMoE-S-E16 / Dense-DiT-S step time: **{step_ratio:.3f}** (goal <= {GOAL})")
    return text, {"step_ratio": step_ratio, "step_ms": {k: m["ms"] for k, m in measured.items()},
                  "peak_memory_gb": {k: m["peak_gb"] for k, m in measured.items()},
                  "mfu": {k: m["mfu"] for k, m in measured.items()},
                  "tflop_per_step": {k: m["tflop"] for k, m in measured.items()},
                  "peak_tflops": s.peak_tflops}


PARTS: list[tuple[str, str, Callable[[Settings], tuple[str, dict]]]] = [
    ("syncs", "(a) Host syncs", part_syncs),
    ("precision", "(b) bf16 against fp32", part_precision),
    ("layers", "(c) MoE layer forward + backward", part_layers),
    ("steps", "(d) Train step: DiffMoE-S-E16 vs Dense-DiT-S", part_steps),
]


# ---------------------------------------------------------------------------------------------- report
def section(s: Settings, done: dict[str, dict]) -> str:
    intro = (f"`python benchmarks/gpu_check.py{' --dry-run' if s.dry_run else ''}` on {device_name(s.device)}, "
             f"torch {torch.__version__}. Goals: DiffMoE layer <= {GOAL}x the FLOP-matched dense FFN, DiffMoE-S step "
             f"<= {GOAL}x Dense-S, 0 host syncs."
             + (" **Dry run**: tiny sizes on CPU, checking the code paths, not the hardware." if s.dry_run else ""))
    parts = [f"**{r['heading']}** ({r['seconds']:.0f} s): " + r["markdown"] for r in done.values()]
    return "\n\n".join([intro, *parts])


def goals(headline: dict) -> dict[str, bool | None]:
    """Each goal: met, not met, or None when its part did not report."""
    layers = headline.get("layer_ratios")
    return {"layer_le_1.15x_flop_matched": None if layers is None else
            all(r["diffmoe_vs_flop_matched_dense"] <= GOAL for r in layers.values()),
            "step_le_1.15x_dense": None if "step_ratio" not in headline else headline["step_ratio"] <= GOAL,
            "zero_syncs": None if "syncs" not in headline else headline["syncs"] == 0}


def run_parts(s: Settings, parts: list[tuple[str, str, Callable[[Settings], tuple[str, dict]]]] = PARTS) -> dict:
    """Run every part, rewriting the results section after each; -> the JSON headline."""
    done: dict[str, dict] = {}
    headline: dict = {"device": device_name(s.device), "torch": torch.__version__, "dry_run": s.dry_run, "errors": {}}
    for key, heading, fn in parts:
        print(f"gpu_check: {heading} ...", file=sys.stderr, flush=True)
        begin = time.perf_counter()
        try:
            markdown, values = fn(s)
            headline.update(values)
        except Exception as e:  # noqa: BLE001 - a part's failure is its report; the next part still runs
            traceback.print_exc()
            markdown = f"**failed**: `{type(e).__name__}: {e}`"
            headline["errors"][key] = f"{type(e).__name__}: {e}"
        done[key] = {"heading": heading, "markdown": markdown, "seconds": time.perf_counter() - begin}
        update_results("gpu", section(s, done), s.results)
    print(section(s, done))  # the figures in the run's log too (a device run returns only its output)
    headline["goals_met"] = goals(headline)
    headline["seconds"] = {key: r["seconds"] for key, r in done.items()}
    return headline


def rounded(value):  # noqa: ANN001, ANN201 - JSON values of any shape
    if isinstance(value, float):
        return value if not math.isfinite(value) or value == 0 else float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: every code path, in CI time")
    parser.add_argument("--results", type=Path, default=None,
                        help="file whose `gpu` section is written (default: benchmarks/RESULTS.md on CUDA, a temp file "
                             "in a dry run)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak for MFU (default: by device name)")
    parser.add_argument("--from-device", type=Path, default=None, metavar="RESULTS_MD",
                        help="copy the `gpu` section of a results file a device run wrote into benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if args.from_device is not None:
        copy_section("gpu", args.from_device, args.results or RESULTS)
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --dry-run for the CPU check of the code paths")
    s = make_settings(args)
    headline = run_parts(s)
    print(f"gpu_check: section `gpu` written to {s.results}", file=sys.stderr)
    print(json.dumps(rounded(headline)))
    return 1 if headline["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
