"""Device->host syncs and collectives of one MoE layer's training forward and backward, per routing
and per expert-parallel size (1, 2, 4 on real gloo ranks).

    python benchmarks/host_syncs.py [--tokens 256]

On CUDA a device->host sync drains the launch queue and a small blocking collective is pure latency.
This machine has no GPU, so the syncs are counted by what would sync on CUDA: `SyncCounter`, a
TorchFunctionMode, counts every call of an op that reads device data on the host (.item / .tolist /
bool / int / float of a tensor, nonzero / argwhere, bincount, unique, masked_select, indexing with
a boolean mask, repeat_interleave with tensor repeats and no output_size, torch.where with only a
condition). `CollectiveCounter` counts the torch.distributed calls. The DESIGN.md cost model:
per MoE layer at EP = N, <= 1 host sync in forward (the all-to-all split sizes) and 0 in backward,
<= 8 collectives in forward and <= 2 in backward; at EP = 1, 0 syncs for expert choice / DiffMoE
and for token choice without a capacity drop (1 with the drop: its kept-pair count is data).

Writes the `host_syncs` section of benchmarks/RESULTS.md; last line JSON
{"max_syncs_forward_ep1_ec": .., "max_syncs_forward_ep": .., "max_syncs_backward": ..,
 "max_collectives_forward": .., "max_collectives_backward": .., "targets_met": bool}.
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

Tensor = torch.Tensor
# Ops that read device memory on the host, whatever their arguments.
_ALWAYS = {Tensor.item, Tensor.tolist, Tensor.__bool__, Tensor.__int__, Tensor.__float__, Tensor.__index__,
           torch.nonzero, Tensor.nonzero, torch.argwhere, Tensor.argwhere, torch.bincount, Tensor.bincount,
           torch.unique, Tensor.unique, torch.unique_consecutive, Tensor.unique_consecutive,
           torch.masked_select, Tensor.masked_select}
_INDEXING = {Tensor.__getitem__, Tensor.__setitem__, Tensor.index_put, Tensor.index_put_}


def _has_bool_index(index: object) -> bool:
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool and i.dim() > 0 for i in items)


def syncs_on_cuda(func, args: tuple, kwargs: dict) -> bool:
    """Whether this call makes the host wait for the device on CUDA."""
    if func in _ALWAYS:
        return True
    if func in _INDEXING:
        return len(args) > 1 and _has_bool_index(args[1])
    if func in (torch.repeat_interleave, Tensor.repeat_interleave):
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None
    if func is torch.where:
        return len(args) + len(kwargs) == 1
    return False


class SyncCounter(TorchFunctionMode):
    """Counts calls that force a device->host sync on CUDA (see `syncs_on_cuda`); `by_op` names them
    with the first frame of this project that made the call."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.by_op: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if syncs_on_cuda(func, args, kwargs):
            self.count += 1
            self.by_op[f"{getattr(func, '__name__', func)} at {_caller()}"] += 1
        return func(*args, **kwargs)


def _caller() -> str:
    root = str(Path(__file__).resolve().parents[1])
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(root) and "host_syncs.py" not in frame.filename:
            return f"{Path(frame.filename).relative_to(root)}:{frame.lineno}"
    return "?"


_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "all_to_all_single", "all_to_all", "broadcast",
                "reduce_scatter_tensor", "reduce_scatter", "all_gather_object", "broadcast_object_list", "barrier",
                "send", "recv", "isend", "irecv", "batch_isend_irecv")


@contextmanager
def count_collectives() -> Iterator[Counter]:
    """Count torch.distributed collective calls made while inside (real collectives still run)."""
    import torch.distributed as dist

    counts: Counter[str] = Counter()
    saved = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def counted(name, fn):
        def call(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return call

    for name, fn in saved.items():
        setattr(dist, name, counted(name, fn))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


# Each routing's training path, as the papers' configs build it (tiny widths; the counts do not
# depend on sizes). Pools: the config's, or ep_group for the pool-wide routings under EP.
ROUTINGS = {
    "diffmoe": ["model.moe.routing=diffmoe", "model.moe.predictor=true"],
    "expert_choice": ["model.moe.routing=expert_choice", "model.moe.pool=sample", "model.moe.predictor=false"],
    "token_choice": ["model.moe.routing=token_choice", "model.moe.top_k=1"],
    "token_choice_drop": ["model.moe.routing=token_choice", "model.moe.top_k=2", "model.moe.drop_tokens=true",
                          "model.moe.capacity=1.0"],
    "diff_moe": ["model.moe.routing=token_choice", "model.moe.top_k=2", "model.moe.time_aware=true",
                 "model.moe.recalibration=true", "model.moe.spatial_conv_kernel=3", "model.moe.activation=swiglu"],
    "recipe": ["model.moe.routing=token_choice", "model.moe.router=sigmoid_bias", "model.moe.top_k=2",
               "model.moe.num_shared_experts=1", "model.moe.activation=swiglu"],
}
SAMPLES, WIDTH, EXPERTS = 2, 16, 8


def _layer_config(routing: str, ep_size: int, tokens_per_sample: int):
    from engine.config import load_config

    pool = [] if routing == "expert_choice" else [f"model.moe.pool={'ep_group' if ep_size > 1 else 'micro_batch'}"]
    side = int(tokens_per_sample**0.5)
    return load_config(None, [f"model.hidden_size={WIDTH}", "model.num_heads=2", f"model.moe.num_experts={EXPERTS}",
                              "model.moe.expert_hidden=32", "model.moe.time_rank=4", f"parallel.ep_size={ep_size}",
                              f"model.input_size={side}", "model.patch_size=1", *pool, *ROUTINGS[routing]])


def measure_layer(routing: str, ep_size: int, tokens_per_sample: int) -> dict[str, object]:
    """One MoE layer (this rank's part of EP = ep_size), one training forward and backward: host
    syncs and collectives of each. Call on every rank of a world of ep_size (or in one process)."""
    from models.moe.layer import MoELayer

    cfg = _layer_config(routing, ep_size, tokens_per_sample)
    rank, world = 0, 1
    layer = MoELayer(cfg.model, 1, ep_rank=0, ep_size=1)
    if ep_size > 1:
        import torch.distributed as dist

        from parallel.expert_parallel import attach_expert_parallel
        from parallel.groups import create_groups

        groups = create_groups(ep_size)
        rank, world = dist.get_rank(), dist.get_world_size()
        layer = MoELayer(cfg.model, 1, ep_rank=groups.ep_rank, ep_size=ep_size)
        attach_expert_parallel(layer, cfg, groups)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(SAMPLES, tokens_per_sample, WIDTH, generator=g, requires_grad=True)
    c = torch.randn(SAMPLES, WIDTH, generator=g, requires_grad=True)
    t = torch.rand(SAMPLES, generator=g)
    layer.train()
    # One uncounted step first: one-time work (e.g. probing the grouped-GEMM kernel) is not per call.
    ((layer(x, c, t).float() ** 2).mean() + layer.aux_loss).backward()
    with count_collectives() as coll_fwd, SyncCounter() as sync_fwd:
        out = layer(x, c, t)
        loss = (out.float() ** 2).mean() + layer.aux_loss
    with count_collectives() as coll_bwd, SyncCounter() as sync_bwd:
        loss.backward()
    return {"routing": routing, "world": world, "ep_size": ep_size,
            "syncs_forward": sync_fwd.count, "syncs_backward": sync_bwd.count,
            "collectives_forward": sum(coll_fwd.values()), "collectives_backward": sum(coll_bwd.values()),
            "sync_ops": dict(sync_fwd.by_op + sync_bwd.by_op),
            "collective_ops": dict(coll_fwd), "collective_ops_backward": dict(coll_bwd)}


def all_routings(ep_size: int, tokens_per_sample: int) -> list[dict]:
    """`measure_layer` for every routing of ROUTINGS, in order."""
    return [measure_layer(routing, ep_size, tokens_per_sample) for routing in ROUTINGS]


def sync_target(routing: str, ep_size: int) -> int:
    """Allowed host syncs in one training forward (DESIGN.md): the split sizes at EP > 1; at EP = 1
    none, except token choice's capacity drop, whose kept-pair count is data-dependent."""
    return 1 if ep_size > 1 or routing == "token_choice_drop" else 0


def meets_targets(row: dict) -> bool:
    return (row["syncs_forward"] <= sync_target(row["routing"], row["ep_size"]) and row["syncs_backward"] == 0
            and row["collectives_forward"] <= 8 and row["collectives_backward"] <= 2)


def main() -> None:
    from tests.dist_utils import DistributedPool
    from benchmarks.results import update_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per sample (a square number)")
    args = parser.parse_args()

    rows = all_routings(1, args.tokens)
    for world, ep_size in ((2, 2), (4, 4), (4, 2)):  # (4, 2): the pool is smaller than the world
        with DistributedPool(world) as ranks:
            per_rank = ranks.run(all_routings, ep_size, args.tokens)
        for i in range(len(ROUTINGS)):  # the worst rank (they should all agree)
            rows.append(max((r[i] for r in per_rank), key=lambda r: (r["syncs_forward"], r["collectives_forward"])))
    for row in rows:
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("ops")}), flush=True)

    table = ["| routing | world | EP | host syncs fwd | host syncs bwd | collectives fwd | collectives bwd | target met | syncing ops | collectives fwd (bwd) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ops = ", ".join(f"{name} x{n}" for name, n in r["sync_ops"].items()) or "-"
        colls = ", ".join(f"{name} x{n}" for name, n in r["collective_ops"].items()) or "-"
        back = ", ".join(f"{name} x{n}" for name, n in r["collective_ops_backward"].items()) or "-"
        table.append(f"| {r['routing']} | {r['world']} | {r['ep_size']} | {r['syncs_forward']} | {r['syncs_backward']} | "
                     f"{r['collectives_forward']} | {r['collectives_backward']} | {'yes' if meets_targets(r) else '**no**'} | "
                     f"{ops} | {colls} ({back}) |")
    headline = {
        "max_syncs_forward_ep1_ec": max(r["syncs_forward"] for r in rows
                                        if r["ep_size"] == 1 and r["routing"] in ("diffmoe", "expert_choice")),
        "max_syncs_forward_ep": max(r["syncs_forward"] for r in rows if r["ep_size"] > 1),
        "max_syncs_backward": max(r["syncs_backward"] for r in rows),
        "max_collectives_forward": max(r["collectives_forward"] for r in rows),
        "max_collectives_backward": max(r["collectives_backward"] for r in rows),
        "targets_met": all(meets_targets(r) for r in rows),
    }
    update_results("host_syncs", "\n".join([
        f"`python benchmarks/host_syncs.py` — one MoE layer, training forward and backward, {SAMPLES} samples x "
        f"{args.tokens} tokens per rank, {EXPERTS} experts, EP = 1 (one process) and EP = 2, 4 at world 2, 4 and EP = 2 at world 4 (gloo ranks, "
        "pool `ep_group` for the pool-wide routings, radix selection). Host syncs: calls that read device data on "
        "the host on CUDA (a TorchFunctionMode counter); collectives: torch.distributed calls. Targets (DESIGN.md): "
        "EP = 1: 0 syncs (1 for token choice with a capacity drop); EP > 1: <= 1 sync forward (the all-to-all split "
        "sizes), 0 backward, <= 8 collectives forward, <= 2 backward.",
        "", *table, "",
        f"All targets met: **{headline['targets_met']}**."]))
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
