"""Forward + backward time of every MoE routing strategy vs the dense FFN of equal activated FLOPs,
and vs DeepSpeed's MoE layer (deepspeed.moe.layer.MoE, top-1 and top-2), side by side in one process.

    python benchmarks/moe_layer.py [--quick] [--threads 1] [--rounds 15]

Each round times one training iteration (gradients reset, forward, backward of a random cotangent
plus the layer's aux loss) of every case in turn; a case's ratio is the median over rounds of its
time / the time of its dense reference in the same round, so load from other processes on a shared
machine hits both sides alike. Ratios are taken on the process CPU time (one thread by default: the
work done, not the waits for a core that other processes hold); wall-clock ratios are shown too.
Writes the `moe_layer` section of benchmarks/RESULTS.md; the last line is JSON {"d", "E", "tokens",
"diffmoe_vs_dense", "deepspeed_vs_dense", ...} of the S-size case.

Each case's matmul FLOPs of one iteration are counted by torch's FlopCounterMode, so the table also
shows the FLOP ratio to the reference: the floor no implementation of that case can go below
(DiffMoE also trains its capacity predictor, ~9% of a dense FFN's FLOPs at d=384, E=16).

CPU note: expert weight gradients are E times the size of a dense FFN's; glibc hands blocks over
32 MiB straight back to the kernel on free, so every backward would page-fault (and zero) them in
again, a cost a GPU caching allocator does not have. The benchmark therefore keeps freed memory in
the process (glibc mallopt: no mmap, no trim) and sets PyTorch's THP_MEM_ALLOC_ENABLE=1 (huge pages
for large CPU tensors), for every case alike; `--stock-allocator` measures without either.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--stock-allocator" not in sys.argv:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read by torch's CPU allocator at first use

import argparse
import ctypes
import ctypes.util
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula  # noqa: E402

from benchmarks.results import update_results  # noqa: E402
from engine.config import ModelConfig, MoEConfig  # noqa: E402
from models.ffn import DenseFFN  # noqa: E402
from models.moe.layer import MoELayer  # noqa: E402

SIZES = {"S": (384, 16), "B": (768, 16)}  # width, experts
FLOP_MATCHED = "dense FFN, DiffMoE's FLOPs"
TOKENS_PER_SAMPLE = 256  # an ImageNet-256 latent at patch 2
# (size, samples): the headline S case with 2048 tokens, then a real per-GPU micro-batch (256 / 8 GPUs)
RUNS = [("S", 8), ("S", 32), ("B", 8)]


@dataclass
class Case:
    name: str
    module: nn.Module
    reference: str  # name of the dense case of equal activated FLOPs
    note: str
    call: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


@register_flop_formula(torch.ops.aten._grouped_mm)
def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """[R, i] x [E, i, o] and [i, R] x [R, o] (per-expert blocks): 2 * rows * i * o either way."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


def keep_freed_memory() -> bool:
    """glibc: serve every allocation from the heap and never give it back (M_MMAP_MAX = 0,
    M_TRIM_THRESHOLD = max), as a caching allocator would. False when libc is not glibc."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def ours(module, x, c, t):
    return module(x, c, t), getattr(module, "aux_loss", None)


def deepspeed_call(module, x, c, t):
    out, aux, _ = module(x)
    return out, aux


def init_single_rank_gloo() -> None:
    """DeepSpeed's MoE needs torch.distributed: a 1-rank gloo group on a free loopback port."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    from parallel.zero import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def moe_layer(d: int, **kw) -> MoELayer:
    return MoELayer(ModelConfig(hidden_size=d, num_heads=1, moe=MoEConfig(**kw)), block_index=1)


def our_cases(d: int, experts: int) -> list[Case]:
    """The dense references and this project's MoE routings at width d with `experts` experts."""
    torch.manual_seed(0)
    h = 4 * d
    return [
        Case("dense FFN 4d", DenseFFN(d, h), "dense FFN 4d", "reference: one 4d MLP per token", ours),
        Case("dense FFN 8d", DenseFFN(d, 2 * h), "dense FFN 8d", "reference of top-2 (two 4d experts per token)", ours),
        # 12 d h' = 48 d^2 + (4 d^2 + 12 d E): the experts' FLOPs plus the predictor's and the router's
        Case(FLOP_MATCHED, DenseFFN(d, h + d // 3 + experts), "dense FFN 4d",
             "hidden 4d + d/3 + E: as many FLOPs as DiffMoE's training iteration, predictor and router included", ours),
        Case("diffmoe", moe_layer(d, routing="diffmoe", num_experts=experts, capacity=1.0), "dense FFN 4d",
             "expert choice over the micro-batch pool, capacity 1 (exactly one expert row per token), "
             "training its capacity predictor", ours),
        Case("diffmoe, no predictor", moe_layer(d, routing="diffmoe", num_experts=experts, capacity=1.0, predictor=False),
             "dense FFN 4d", "the same routing without training the predictor", ours),
        Case("expert_choice", moe_layer(d, routing="expert_choice", pool="sample", num_experts=experts, capacity=1.0,
                                        predictor=False), "dense FFN 4d", "EC-DiT: per-sample pool, capacity 1", ours),
        Case("token_choice top-1", moe_layer(d, routing="token_choice", num_experts=experts, top_k=1, capacity=1.0,
                                             drop_tokens=True),
             "dense FFN 4d", "TC-DiT: capacity factor 1, balance loss; tokens over capacity are dropped and not computed", ours),
        Case("token_choice top-2", moe_layer(d, routing="token_choice", num_experts=experts, top_k=2, drop_tokens=False),
             "dense FFN 8d", "no drop (unequal groups: grouped GEMM path)", ours),
    ]


def deepspeed_cases(d: int, experts: int, top_ks: tuple[int, ...] = (1, 2)) -> list[Case]:
    """deepspeed.moe.layer.MoE at top-k in `top_ks` (ImportError when DeepSpeed is not installed)."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    init_single_rank_gloo()
    references = {1: "dense FFN 4d", 2: "dense FFN 8d"}
    return [Case(f"deepspeed top-{k}", DeepSpeedMoE(d, DenseFFN(d, 4 * d), num_experts=experts, ep_size=1, k=k,
                                                    capacity_factor=1.0, min_capacity=4, drop_tokens=True),
                 references[k], "deepspeed.moe.layer.MoE, capacity factor 1: tokens over capacity are dropped, "
                 "their slots computed as zero rows", deepspeed_call) for k in top_ks]


def build_cases(d: int, experts: int) -> list[Case]:
    cases = our_cases(d, experts)
    try:
        cases += deepspeed_cases(d, experts)
    except ImportError as e:  # the table then says DeepSpeed was not measured
        print(f"deepspeed unavailable ({e}); its rows are skipped", file=sys.stderr)
    for case in cases:
        case.module.train()
    return cases


def iteration(case: Case, x: torch.Tensor, c: torch.Tensor, t: torch.Tensor, grad: torch.Tensor) -> None:
    """One training iteration: gradients reset, forward, backward of a random cotangent + aux loss."""
    for p in case.module.parameters():
        p.grad = None
    x.grad = None
    out, aux = case.call(case.module, x, c, t)
    loss = (out * grad).sum()
    if aux is not None and aux.requires_grad:
        loss = loss + aux
    loss.backward()


def step(case: Case, *inputs: torch.Tensor) -> tuple[float, float]:
    """-> (CPU seconds of this process, wall seconds) of one training iteration."""
    cpu, wall = time.process_time(), time.perf_counter()
    iteration(case, *inputs)
    return time.process_time() - cpu, time.perf_counter() - wall


def count_flops(case: Case, *inputs: torch.Tensor) -> int:
    """Matmul FLOPs of one training iteration (after an uncounted one: one-time kernel probes are not work)."""
    iteration(case, *inputs)
    with FlopCounterMode(display=False) as counter:
        iteration(case, *inputs)
    return counter.get_total_flops()


def measure(size: str, batch: int, rounds: int, warmup: int = 2) -> tuple[str, dict]:
    d, experts = SIZES[size]
    cases = build_cases(d, experts)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, TOKENS_PER_SAMPLE, d, generator=g).requires_grad_()
    c, t = torch.randn(batch, d, generator=g), torch.rand(batch, generator=g)
    grad = torch.randn(batch, TOKENS_PER_SAMPLE, d, generator=g)
    flops = {case.name: count_flops(case, x, c, t, grad) for case in cases}
    cpu: dict[str, list[float]] = {case.name: [] for case in cases}
    wall: dict[str, list[float]] = {case.name: [] for case in cases}
    for r in range(warmup + rounds):
        for case in cases:
            cpu_s, wall_s = step(case, x, c, t, grad)
            if r >= warmup:
                cpu[case.name].append(cpu_s)
                wall[case.name].append(wall_s)
        print(f"  {size} x {batch} round {r + 1}/{warmup + rounds}", file=sys.stderr, end="\r")
    print(file=sys.stderr)

    def ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
        return statistics.median(a / b for a, b in zip(times[name], times[reference]))

    ratios = {case.name: ratio(cpu, case.name, case.reference) for case in cases}
    vs_flop_matched = ratio(cpu, "diffmoe", FLOP_MATCHED)
    flop_ratios = {case.name: flops[case.name] / flops[case.reference] for case in cases}
    rows = [f"| {case.name} | {statistics.median(cpu[case.name]) * 1e3:.1f} | {min(cpu[case.name]) * 1e3:.1f} | "
            f"**{ratios[case.name]:.2f}** × {case.reference} | {ratio(wall, case.name, case.reference):.2f} | {flop_ratios[case.name]:.3f} | "
            f"{flop_ratios[case.name] / ratios[case.name]:.0%} | {case.note} |" for case in cases]
    table = (f"**{size}**: d={d}, E={experts}, {batch * TOKENS_PER_SAMPLE} tokens ({batch} × {TOKENS_PER_SAMPLE}), "
             f"fp32, {torch.get_num_threads()} thread(s), {rounds} interleaved rounds\n\n"
             "| case | median CPU ms | min CPU ms | ratio (CPU time) | ratio (wall) | FLOP ratio | FLOP ratio ÷ time ratio "
             "| what |\n|---|---|---|---|---|---|---|---|\n"
             + "\n".join(rows) + f"\n\ndiffmoe ÷ {FLOP_MATCHED} (CPU time): **{vs_flop_matched:.2f}**")
    return table, {"d": d, "E": experts, "tokens": batch * TOKENS_PER_SAMPLE, "ratios": ratios, "flop_ratios": flop_ratios,
                   "diffmoe_vs_flop_matched_dense": vs_flop_matched}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the S-size, 2048-token case only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least disturbed by other load)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--stock-allocator", action="store_true",
                        help="measure with glibc's and PyTorch's default CPU allocation (no cached heap, no huge pages)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cached = not args.stock_allocator and keep_freed_memory()
    sections, headline = [], {}
    for i, (size, batch) in enumerate(RUNS[:1] if args.quick else RUNS):
        table, measured = measure(size, batch, args.rounds)
        sections.append(table)
        print(table)
        if i == 0:
            headline = measured
    ratios, flop_ratios = headline["ratios"], headline["flop_ratios"]
    d, experts, tokens = headline["d"], headline["E"], headline["tokens"]
    expert_mb = experts * 2 * d * 4 * d * 4 / 2**20
    why = (f"Where the time goes: at equal FLOPs each of the {experts} experts' weights serves only "
           f"{tokens // experts} tokens per step (the dense FFN's: {tokens}), so every expert matmul re-reads and "
           f"re-packs its weight block for few rows: the {expert_mb:.0f} MiB of expert weights stream from memory "
           f"(forward and backward) and their gradients are written, traffic a {expert_mb / experts:.1f} MiB dense "
           f"FFN that stays in cache does not have; it shrinks as tokens per expert grow (the {4 * tokens}-token "
           "rows, a per-GPU micro-batch of the papers' batch 256 on 8 GPUs). DiffMoE also trains its capacity "
           "predictor (Linear(d, d) -> SiLU -> Linear(d, E) on every token, forward and weight gradients): at "
           f"d={d}, E={experts} that is {flop_ratios['diffmoe'] - flop_ratios['diffmoe, no predictor']:.3f} of the "
           f"dense FFN's FLOPs, so the DiffMoE layer cannot cost less than {flop_ratios['diffmoe']:.3f}x the dense "
           "FFN of equal activated FLOPs on any hardware; `diffmoe, no predictor` isolates the routing itself, and "
           f"the `{FLOP_MATCHED}` row is a dense FFN doing as many FLOPs as DiffMoE's whole training iteration.")
    allocator = "cached heap + huge pages" if cached else "stock"
    update_results("moe_layer", f"`python benchmarks/moe_layer.py{' --quick' if args.quick else ''}` "
                   f"(CPU allocator: {allocator}). Forward + backward of one training iteration.\n\n"
                   + "\n\n".join(sections) + ("" if args.quick else "\n\n" + why))
    summary = {"d": d, "E": experts, "tokens": tokens, "diffmoe_vs_dense": ratios["diffmoe"],
               "deepspeed_vs_dense": ratios.get("deepspeed top-1"), "deepspeed_top2_vs_dense": ratios.get("deepspeed top-2"),
               "diffmoe_no_predictor_vs_dense": ratios["diffmoe, no predictor"],
               "expert_choice_vs_dense": ratios["expert_choice"], "token_choice_top1_vs_dense": ratios["token_choice top-1"],
               "token_choice_top2_vs_dense": ratios["token_choice top-2"],
               "diffmoe_flops_vs_dense": flop_ratios["diffmoe"],
               "diffmoe_vs_flop_matched_dense": headline["diffmoe_vs_flop_matched_dense"], "allocator": allocator}
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()}))


if __name__ == "__main__":
    main()
