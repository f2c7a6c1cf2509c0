"""All-to-all dispatch -> experts -> combine on real gloo ranks == LocalDispatcher on the
concatenated batch: outputs, and gradients of the tokens, the per-sample side inputs, the router
(through the gates) and the experts (on their owner rank); uneven loads; bytes equal the lower
bound (hidden states once per (token, remote rank), side inputs once per (sample, remote rank))."""
from __future__ import annotations

import pytest
import torch

from models.moe.dispatcher import LocalDispatcher, RoutingPlan

pytestmark = pytest.mark.slow

T, D, DC, TPS = 6, 8, 3, 3  # tokens per rank, hidden width, side-input width, tokens per sample
EXPERTS_PER_RANK = 2
MASKS = ["random", "dense", "none", "expert_idle_on_rank0", "rank1_sends_nothing", "token_choice"]


def problem(world: int, ep_size: int, kind: str) -> dict[str, torch.Tensor]:
    """The whole job's tensors (every rank builds the same) and a [world*T, E] selection mask."""
    num_experts = EXPERTS_PER_RANK * ep_size
    g = torch.Generator().manual_seed(MASKS.index(kind))
    rows = world * T
    data = {
        "x": torch.randn(rows, D, generator=g), "c": torch.randn(rows // TPS, DC, generator=g),
        "router": 0.5 * torch.randn(D, num_experts, generator=g),
        "w": torch.randn(num_experts, D, D, generator=g) / D**0.5, "v": 0.3 * torch.randn(num_experts, DC, D, generator=g),
        "loss_weights": torch.randn(rows, D, generator=g),
    }
    mask = torch.rand(rows, num_experts, generator=g) < 0.5
    if kind == "dense":  # every expert takes every token: each token goes once to every rank
        mask[:] = True
    elif kind == "none":
        mask[:] = False
    elif kind == "expert_idle_on_rank0":  # rank 0's tokens never reach expert 1
        mask[:T, 1] = False
    elif kind == "rank1_sends_nothing":
        mask[T:2 * T] = False
    elif kind == "token_choice":  # top-2 experts per token by router score
        top = (data["x"] @ data["router"]).topk(2, dim=1).indices
        mask = torch.zeros_like(mask).scatter_(1, top, True)
    data["mask"] = mask
    return data


def experts_fn(tokens: torch.Tensor, counts: list[int], cond: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-expert y = tanh(x W_e) * (1 + c V_e) on rows grouped by expert."""
    outs, start = [], 0
    for e, n in enumerate(counts):
        xs, cs = tokens[start:start + n], cond[start:start + n]
        outs.append(torch.tanh(xs @ w[e]) * (1 + cs @ v[e]))
        start += n
    return torch.cat(outs) if outs else tokens[:0]


def forward_backward(data: dict, rows: slice, experts: slice, dispatcher) -> dict:
    x = data["x"][rows].clone().requires_grad_()
    c = data["c"][rows.start // TPS:rows.stop // TPS].clone().requires_grad_()
    router = data["router"].clone().requires_grad_()
    w, v = data["w"][experts].clone().requires_grad_(), data["v"][experts].clone().requires_grad_()
    gates = torch.softmax(x @ router, dim=-1)
    plan = RoutingPlan(data["mask"][rows], gates, TPS)
    routed = dispatcher.dispatch(plan, x, (c,))
    out = dispatcher.combine(experts_fn(routed.tokens, routed.sizes.host_counts(), routed.sample_inputs[0], w, v), routed)
    (out * data["loss_weights"][rows]).sum().backward()
    return {"out": out.detach(), "x": x.grad, "c": c.grad, "router": router.grad, "w": w.grad, "v": v.grad}


def _dispatch_on_rank(world: int, ep_size: int) -> list[tuple[dict, dict]]:
    import torch.distributed as dist

    from parallel.dispatch import AllToAllDispatcher
    from parallel.groups import create_groups

    groups = create_groups(ep_size)
    rank = dist.get_rank()
    dispatcher = AllToAllDispatcher(groups.ep_group, groups.ep_rank, ep_size, EXPERTS_PER_RANK * ep_size)
    results = []
    for kind in MASKS:
        data = problem(world, ep_size, kind)
        own = slice(dispatcher.expert_offset, dispatcher.expert_offset + EXPERTS_PER_RANK)
        grads = forward_backward(data, slice(rank * T, (rank + 1) * T), own, dispatcher)
        results.append((grads, dispatcher.counter.drain()))
    return results


def remote_pairs(mask: torch.Tensor, rank: int, ep_size: int, per: int = 1) -> int:
    """Lower bound in rows: chosen (token, remote expert-rank) pairs of `rank`'s tokens; with per=TPS,
    (sample, remote expert-rank) pairs."""
    own = mask[rank * T:(rank + 1) * T].view(T // per, per, ep_size, EXPERTS_PER_RANK).any(-1).any(1)
    own[:, rank % ep_size] = False
    return int(own.sum())


@pytest.mark.parametrize("world,ep_size", [(2, 2), (4, 4), (4, 2)])
def test_dispatch_combine_equal_local_dispatcher(pools, world, ep_size):
    results = pools(world).run(_dispatch_on_rank, world, ep_size)
    for i, kind in enumerate(MASKS):
        data = problem(world, ep_size, kind)
        for first in range(0, world, ep_size):  # one independent job per EP group
            group = range(first, first + ep_size)
            ref = forward_backward(data, slice(first * T, (first + ep_size) * T), slice(None), LocalDispatcher())
            for pos, rank in enumerate(group):
                got = results[rank][i][0]
                mine = slice(pos * T, (pos + 1) * T)
                for key in ("out", "x"):
                    torch.testing.assert_close(got[key], ref[key][mine], msg=f"{kind}: {key} on rank {rank}")
                mine_samples = slice(pos * T // TPS, (pos + 1) * T // TPS)
                torch.testing.assert_close(got["c"], ref["c"][mine_samples], msg=f"{kind}: c on rank {rank}")
                experts = slice(pos * EXPERTS_PER_RANK, (pos + 1) * EXPERTS_PER_RANK)
                for key in ("w", "v"):  # expert gradients gather every rank's loss on the owner
                    torch.testing.assert_close(got[key], ref[key][experts], msg=f"{kind}: {key} on rank {rank}")
            # dispatch and combine, forward and backward, each move the bound's rows once over the group
            bound = sum(remote_pairs(data["mask"], rank, ep_size) for rank in group)
            sent = [results[rank][i][1] for rank in group]
            assert sum(s.get("alltoall_bytes", 0.0) for s in sent) == 4 * bound * D * 4, f"{kind}: hidden bytes"
            sample_bound = sum(remote_pairs(data["mask"], rank, ep_size, TPS) for rank in group)
            assert sum(s.get("alltoall_extra_bytes", 0.0) for s in sent) == 2 * sample_bound * DC * 4, f"{kind}: extra bytes"
            router_grad = sum(results[rank][i][0]["router"] for rank in group)
            torch.testing.assert_close(router_grad, ref["router"], msg=f"{kind}: router gradient")
