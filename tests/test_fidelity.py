"""Paper fidelity (docs/fidelity.md): each point where our layers once differed from a reference,
checked against an independent reference — a hand-computed case, a separate forward, or the
reference's formula."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.config import ModelConfig, MoEConfig, load_config
from models.moe.layer import MoELayer

torch.set_num_threads(1)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "imagenet256"


def layer_of(d: int, **moe_kw) -> MoELayer:
    return MoELayer(ModelConfig(hidden_size=d, num_heads=1, moe=MoEConfig(**moe_kw)), block_index=1)


def gelu_expert(layer: MoELayer, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of a GELU bank on rows x [R, d], written out independently of the grouped kernels."""
    ex = layer.experts
    return F.gelu(x @ ex.w1[e] + ex.b1[e], approximate="tanh") @ ex.w2[e].t() + ex.b2[e]


# ---------------------------------------------------------------------------------------- 1. TC-DiT
@pytest.mark.parametrize("size", ["s", "b", "l"])
def test_tc_dit_configs_never_drop(size):
    cfg = load_config(CONFIGS / f"tc_dit_{size}_e16_flow.yaml")
    assert cfg.model.moe.routing == "token_choice" and not cfg.model.moe.drop_tokens


def test_token_choice_without_drop_computes_every_pair_in_training():
    """The TC-DiT config's layer, every token sent to expert 0: nothing is dropped, each token's
    output is its top-1 softmax weight times expert 0 (capacity 1 would have kept 1/E of them)."""
    moe = load_config(CONFIGS / "tc_dit_s_e16_flow.yaml").model.moe
    layer = MoELayer(ModelConfig(hidden_size=8, num_heads=1, moe=MoEConfig(**{**vars(moe), "num_experts": 4,
                                                                             "expert_hidden": 16})), block_index=1)
    layer.train()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 1.0  # logit of expert 0 = x[0] > 0: every token prefers expert 0
    x = torch.randn(2, 16, 8)
    x[..., 0] = x[..., 0].abs() + 0.5
    out = layer(x, torch.zeros(2, 8), torch.rand(2))
    flat = x.reshape(-1, 8)
    weight = torch.softmax(flat @ layer.router.weight.t(), dim=-1)[:, :1]
    assert torch.allclose(out.reshape(-1, 8), weight * gelu_expert(layer, 0, flat), atol=1e-5)
    assert layer.stats["dropped_frac"].item() == 0.0
    assert layer.stats["tokens_per_expert"].tolist() == [32.0, 0.0, 0.0, 0.0]


# ----------------------------------------------------------------- 8. dynamic inference, pool: sample
def test_dynamic_inference_with_sample_pool_equals_each_sample_alone():
    """The paper's local dynamic intra-sample row: with pool=sample each sample's routing is its own,
    so a batch gives what every sample gives when run alone; the batch-level pool does not."""
    torch.manual_seed(0)
    local = layer_of(8, routing="expert_choice", pool="sample", num_experts=4, expert_hidden=16, inference="dynamic")
    batch = layer_of(8, routing="diffmoe", pool="micro_batch", num_experts=4, expert_hidden=16, inference="dynamic")
    batch.load_state_dict(local.state_dict())
    for layer in (local, batch):
        layer.eval()
        layer.predictor.threshold.fill_(0.5)
    x, c, t = torch.randn(3, 16, 8), torch.randn(3, 8), torch.rand(3)
    x[0] *= 3.0  # samples that differ in scale compete unevenly in a shared pool
    alone = torch.cat([local(x[i:i + 1], c[i:i + 1], t[i:i + 1]) for i in range(3)])
    assert torch.allclose(local(x, c, t), alone, atol=1e-6)
    assert not torch.allclose(batch(x, c, t), alone, atol=1e-3)
