"""The equivalence invariant at the MoE layer: 2 ranks, ep_size 2, pool `ep_group` (or `world`),
micro-batches b0, b1 == 1 process, pool `micro_batch`, batch [b0; b1]: outputs, loss, every gradient
(expert gradients on their owner rank) and the predictor thresholds agree to 1e-5."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.config import Config, load_config
from models.moe.layer import MoELayer
from tests.dist_utils import DistributedPool

pytestmark = pytest.mark.slow

B, N, D = 2, 8, 8  # samples per rank, tokens per sample, width
BASE = ["model.hidden_size=8", "model.num_heads=2", "model.moe.num_experts=4", "model.moe.expert_hidden=16",
        "model.moe.time_rank=4"]
VARIANTS = {
    "diffmoe": ["model.moe.routing=diffmoe", "model.moe.time_aware=true", "model.moe.recalibration=true",
                "model.moe.num_shared_experts=1", "model.moe.activation=swiglu"],
    "diffmoe_gather": ["model.moe.routing=diffmoe", "parallel.pool_selection=gather", "model.moe.capacity=1.5"],
    "token_choice": ["model.moe.routing=token_choice", "model.moe.top_k=2", "model.moe.capacity=0.75",
                     "model.moe.drop_tokens=true"],
    "expert_choice": ["model.moe.routing=expert_choice", "model.moe.pool=sample"],
}


class OneBlock(nn.Module):
    """A dense projection feeding one MoE layer, so gradients cross the dispatcher into dense weights."""

    def __init__(self, cfg: Config, ep_rank: int, ep_size: int):
        super().__init__()
        self.proj = nn.Linear(D, D)
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            self.proj.weight.copy_(torch.randn(D, D, generator=g) / D**0.5)
            self.proj.bias.copy_(0.1 * torch.randn(D, generator=g))
        self.moe = MoELayer(cfg.model, 1, ep_rank=ep_rank, ep_size=ep_size)

    def forward(self, x: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.moe(self.proj(x), c, t)


def config(variant: str, pool: str, ep_size: int) -> Config:
    overrides = BASE + [f"model.moe.pool={pool}", f"parallel.ep_size={ep_size}"] + VARIANTS[variant]
    return load_config(None, overrides)


def batch(world: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    rows = world * B
    return {"x": torch.randn(rows, N, D, generator=g), "c": torch.randn(rows, D, generator=g),
            "t": torch.rand(rows, generator=g), "target": torch.randn(rows, N, D, generator=g)}


def loss_share(model: OneBlock, data: dict, rows: slice, global_batch: int, world: int) -> torch.Tensor:
    """This process's share of the global loss: sum of its samples' MSE / global batch + aux / world."""
    out = model(data["x"][rows], data["c"][rows], data["t"][rows])
    per_sample = ((out - data["target"][rows]) ** 2).mean((1, 2))
    return per_sample.sum() / global_batch + model.moe.aux_loss / world, out


def run_model(cfg: Config, groups, data: dict, rows: slice, world: int) -> dict:
    from parallel.expert_parallel import attach_expert_parallel

    model = OneBlock(cfg, groups.ep_rank if groups else 0, groups.ep_size if groups else 1)
    if groups is not None:
        attach_expert_parallel(model, cfg, groups)
    loss, out = loss_share(model, data, rows, data["x"].shape[0], world)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in model.named_buffers() if "threshold" in n}
    return {"out": out.detach(), "loss": loss.detach(), "grads": grads, "buffers": buffers,
            "expert": {n for n, p in model.named_parameters() if getattr(p, "_is_expert", False)}}


def _layer_on_rank(variant: str, pool: str, ep_size: int) -> dict:
    import torch.distributed as dist
    from parallel.groups import create_groups

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = config(variant, pool, ep_size)
    groups = create_groups(ep_size)
    result = run_model(cfg, groups, batch(world), slice(rank * B, (rank + 1) * B), world)
    result["ep_rank"] = groups.ep_rank
    return result


@pytest.fixture(scope="module")
def ranks():
    with DistributedPool(2) as pool:
        yield pool


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_rank_layer_equals_one_process(ranks, variant):
    pool = "sample" if variant == "expert_choice" else "ep_group"
    results = ranks.run(_layer_on_rank, variant, pool, 2)
    ref = run_model(config(variant, "sample" if pool == "sample" else "micro_batch", 1), None, batch(2), slice(None), 1)

    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(torch.cat([r["out"] for r in results]), ref["out"].reshape(2 * B, N, D), **tol)
    torch.testing.assert_close(sum(r["loss"] for r in results), ref["loss"], **tol)
    for name, want in ref["grads"].items():
        if name in ref["expert"]:  # experts: the owner holds rows [ep_rank * E/2, (ep_rank + 1) * E/2)
            for r in results:
                local = want.shape[0] // 2
                got = r["grads"][name]
                torch.testing.assert_close(got, want[r["ep_rank"] * local:(r["ep_rank"] + 1) * local], **tol,
                                           msg=f"{variant}: expert gradient {name}")
        else:  # dense: each rank holds its share; DeepSpeed sums them
            torch.testing.assert_close(sum(r["grads"][name] for r in results), want, **tol,
                                       msg=f"{variant}: dense gradient {name}")
    for name, want in ref["buffers"].items():
        for r in results:
            torch.testing.assert_close(r["buffers"][name], want, **tol, msg=f"{variant}: buffer {name}")
