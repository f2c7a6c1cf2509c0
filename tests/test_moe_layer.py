"""The MoE layer end to end against independent per-token references, gradcheck, EP-layout
independent init, inference modes, capacity schedule, monitors, and a whole DiT with MoE slots."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from engine.config import ModelConfig, MoEConfig, load_config
from models import build_model, moe
from models.moe.grouped_mm import GroupSizes, _grouped_mm_supported, _Groups, grouped_linear
from models.moe.layer import MoELayer

torch.set_num_threads(1)


def layer_of(d: int = 2, **moe_kw) -> MoELayer:
    cfg = ModelConfig(hidden_size=d, num_heads=1, moe=MoEConfig(**moe_kw))
    return MoELayer(cfg, block_index=1)


def expert_reference(layer: MoELayer, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of a plain GELU bank applied to one token, written out independently."""
    ex = layer.experts
    return F.gelu(x @ ex.w1[e] + ex.b1[e], approximate="tanh") @ ex.w2[e].t() + ex.b2[e]


def per_token_reference(layer: MoELayer, x: torch.Tensor, pairs: dict[int, list[int]], weights: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(flat)
    for e, tokens in pairs.items():
        for tok in tokens:
            out[tok] += weights[tok, e] * expert_reference(layer, e, flat[tok])
    return out.reshape(x.shape)


# router = identity: logits = x, so the softmax scores are known in closed form
X = torch.tensor([[[2.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [3.0, 0.0]]])  # B=2, N=2
P0 = torch.sigmoid(torch.tensor([2.0, -2.0, 0.0, 3.0]))  # softmax([a, b])[0] = sigmoid(a - b)
SOFTMAX = torch.stack([P0, 1 - P0], dim=1)


def with_identity_router(layer: MoELayer) -> MoELayer:
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))
    return layer


@pytest.mark.parametrize("routing, pool, pairs", [
    # k = int(4 / 2 * 1) = 2: expert 0 takes tokens 3 (0.95), 0 (0.88); expert 1 tokens 1 (0.88), 2 (0.5)
    ("diffmoe", "micro_batch", {0: [0, 3], 1: [1, 2]}),
    # k = int(2 / 2 * 1) = 1 per sample: sample 0 = tokens {0, 1}, sample 1 = {2, 3}
    ("expert_choice", "sample", {0: [0, 3], 1: [1, 2]}),
])
def test_expert_choice_layer_hand_computed(routing, pool, pairs):
    layer = with_identity_router(layer_of(routing=routing, pool=pool, num_experts=2, expert_hidden=3, predictor=False))
    out = layer(X, torch.zeros(2, 2), torch.tensor([0.1, 0.9]))
    assert torch.allclose(out, per_token_reference(layer, X, pairs, SOFTMAX), atol=1e-6)
    assert layer.stats["tokens_per_expert"].tolist() == [2.0, 2.0]
    assert layer.stats["unrouted_frac"].item() == 0.0


def test_token_choice_layer_hand_computed_with_drop():
    layer = with_identity_router(layer_of(routing="token_choice", num_experts=2, top_k=1, expert_hidden=3,
                                          capacity=1.0, drop_tokens=True, aux_loss_weight=0.01))
    layer.train()
    out = layer(X, torch.zeros(2, 2), torch.tensor([0.1, 0.9]))
    # top-1: tokens 0, 2 (tie -> lower id), 3 choose expert 0; capacity int(1 * 4 * 1 / 2) = 2 drops token 2
    assert torch.allclose(out, per_token_reference(layer, X, {0: [0, 3], 1: [1]}, SOFTMAX), atol=1e-6)
    assert layer.stats["dropped_frac"].item() == pytest.approx(0.25)
    # balance loss: f = [3/4, 1/4], P = mean softmax
    expected = 2 * (0.75 * SOFTMAX[:, 0].mean() + 0.25 * SOFTMAX[:, 1].mean())
    assert layer.aux_loss.item() == pytest.approx(0.01 * expected.item(), rel=1e-5)
    layer.eval()  # inference: no drop, token 2 is computed
    out = layer(X, torch.zeros(2, 2), torch.tensor([0.1, 0.9]))
    assert torch.allclose(out, per_token_reference(layer, X, {0: [0, 2, 3], 1: [1]}, SOFTMAX), atol=1e-6)


def random_inputs(b: int, n: int, d: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, n, d, generator=g, dtype=dtype), torch.randn(b, d, generator=g, dtype=dtype),
            torch.rand(b, generator=g, dtype=dtype))


def test_micro_batch_pool_with_batch_one_equals_sample_pool():
    x, c, t = random_inputs(1, 16, 8)
    a = layer_of(8, routing="diffmoe", pool="micro_batch", num_experts=4, expert_hidden=16)
    b = layer_of(8, routing="diffmoe", pool="sample", num_experts=4, expert_hidden=16)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x, c, t), b(x, c, t))


def test_predictor_targets_are_the_selection_mask_and_threshold_tracks_kth():
    layer = layer_of(8, routing="diffmoe", num_experts=4, expert_hidden=16, predictor_loss_weight=0.5)
    layer.train()
    x, c, t = random_inputs(2, 8, 8)
    layer(x, c, t)
    flat = x.reshape(-1, 8)
    scores = torch.softmax(flat @ layer.router.weight.t(), dim=-1)
    k = 16 // 4
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(0, scores.topk(k, dim=0).indices, True)
    logits = layer.predictor(flat)
    assert layer.aux_loss.item() == pytest.approx(0.5 * F.binary_cross_entropy_with_logits(logits, mask.float()).item(), rel=1e-5)
    kth = torch.sigmoid(logits).topk(k, dim=0).values[-1]
    assert torch.allclose(layer.predictor.threshold, 0.05 * kth, atol=1e-6)  # EMA from 0, decay 0.95


GRADCHECK_VARIANTS = {
    "diffmoe": dict(routing="diffmoe", num_experts=4, capacity=1.5),
    "token_choice": dict(routing="token_choice", num_experts=4, top_k=2, capacity=0.75, drop_tokens=True),
    "diff_moe": dict(routing="token_choice", num_experts=4, top_k=2, drop_tokens=False, activation="swiglu",
                     time_aware=True, time_rank=3, recalibration=True, num_shared_experts=1),
    "recipe": dict(routing="token_choice", num_experts=4, top_k=2, router="sigmoid_bias", routed_scaling=2.0,
                   activation="swiglu", num_shared_experts=1, drop_tokens=False),
}


@pytest.mark.parametrize("variant", sorted(GRADCHECK_VARIANTS))
def test_gradcheck_float64(variant):
    layer = layer_of(4, expert_hidden=6, **GRADCHECK_VARIANTS[variant]).double()
    layer.train()
    with torch.no_grad():  # non-zero time modulation so its gradients are exercised too
        for name, p in layer.named_parameters():
            if "ada_up" in name:
                p.normal_(0, 0.3)
    x, c, t = random_inputs(2, 4, 4, dtype=torch.float64)
    checked = ("router.weight", "experts.w1", "experts.w2", "experts.b1", "experts.b2", "experts.ada_up", "experts.ada_down",
               "recalibration.up.weight", "shared.ffn.w2")
    names = [n for n, _ in layer.named_parameters() if n in checked]
    params = [p.detach().clone().requires_grad_() for n, p in layer.named_parameters() if n in checked]

    def fn(x, c, *ps):
        out = functional_call(layer, dict(zip(names, ps)), (x, c, t), strict=False)
        # the predictor's BCE sees x detached by design (its true x-derivative is not backpropagated)
        return out if layer.predictor is not None else (out, layer.aux_loss)

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), c.requires_grad_(), *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("counts, dtype, kind", [([3, 3, 3, 3], torch.float32, "equal"),
                                                  ([3, 0, 5, 1], torch.float32, "grouped"),
                                                  ([3, 0, 5, 1], torch.float64, "padded")])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("known_on", ["host", "device"])
def test_grouped_linear_kernels_match_a_per_expert_loop(counts, dtype, kind, transposed, known_on):
    if kind == "grouped" and not _grouped_mm_supported(torch.device("cpu"), dtype):
        pytest.skip("torch._grouped_mm is not available in this build")
    rows, starts = sum(counts), [sum(counts[:e]) for e in range(len(counts))]
    x = torch.randn(rows, 8, dtype=dtype, requires_grad=True)  # widths of 16-byte multiples: _grouped_mm's rule
    # a transposed weight is the view of an [E, o, i] parameter, as the experts' w2 is
    param = torch.randn(4, 12, 8, dtype=dtype) if transposed else torch.randn(4, 8, 12, dtype=dtype)
    param.requires_grad_()
    w = param.transpose(1, 2) if transposed else param
    bias = torch.randn(4, 12, dtype=dtype, requires_grad=True)
    g = torch.randn(rows, 12, dtype=dtype)
    # counts only on the device (token choice, the all-to-all's receiving side): equal counts are not
    # recognised without reading them back, so the grouped kernel runs instead of bmm
    sizes = GroupSizes.of(counts) if known_on == "host" else GroupSizes(rows, len(counts), device=torch.tensor(counts))
    if known_on == "device" and kind == "equal":
        kind = "grouped" if _grouped_mm_supported(torch.device("cpu"), dtype) else "padded"
    assert _Groups(sizes, x, w).kind == kind
    ref = torch.cat([x[s:s + n] @ w[e] + bias[e] for e, (s, n) in enumerate(zip(starts, counts))])
    ref_grads = torch.autograd.grad((ref * g).sum(), (x, param, bias))
    y = grouped_linear(x, w, bias, sizes)
    assert torch.allclose(y, ref, atol=1e-5)
    grads = torch.autograd.grad((y * g).sum(), (x, param, bias))
    for got, want, leaf in zip(grads, ref_grads, (x, param, bias)):
        # gradients come out in the leaf's own memory layout, so AccumulateGrad keeps them without a copy
        assert got.stride() == leaf.stride() and torch.allclose(got, want, atol=1e-4)
    assert grads[2][1].eq(0).all() == (counts[1] == 0)  # an expert without rows gets a zero bias gradient


def test_grouped_linear_without_rows_keeps_zero_gradients():
    x = torch.zeros(0, 8, requires_grad=True)
    w = torch.randn(2, 8, 4, requires_grad=True)
    y = grouped_linear(x, w, None, [0, 0])
    assert y.shape == (0, 4)
    y.sum().backward()
    assert w.grad is not None and w.grad.eq(0).all()


def test_expert_init_is_independent_of_the_ep_layout_and_global_rng():
    kw = dict(routing="diffmoe", num_experts=4, expert_hidden=16, time_aware=True, recalibration=True, num_shared_experts=1)
    cfg = ModelConfig(hidden_size=8, num_heads=1, moe=MoEConfig(**kw))
    torch.manual_seed(0)
    full = MoELayer(cfg, 3, 0, 1)
    for rank in range(2):
        torch.manual_seed(123 + rank)  # a different global RNG state changes nothing
        half = MoELayer(cfg, 3, rank, 2)
        assert half.experts.w1.shape[0] == 2
        for name, p in half.named_parameters():
            ref = dict(full.named_parameters())[name]
            expected = ref[2 * rank: 2 * rank + 2] if name.startswith("experts.") else ref
            assert torch.equal(p, expected), name
            assert getattr(p, "_is_expert", False) == name.startswith("experts.")
    other_block = MoELayer(cfg, 5, 0, 1)
    assert not torch.equal(other_block.experts.w1, full.experts.w1)
    assert not torch.equal(full.experts.w1[0], full.experts.w1[1])


def test_constructible_on_meta_device():
    cfg = ModelConfig(hidden_size=64, num_heads=1, moe=MoEConfig(routing="diffmoe", num_experts=8))
    with torch.device("meta"):
        layer = MoELayer(cfg, 1, 1, 2)
    assert layer.experts.w1.is_meta and layer.experts.w1.shape == (4, 64, 256)


def test_sigmoid_bias_counts_loads_and_update_moves_bias_toward_balance():
    layer = layer_of(8, routing="token_choice", router="sigmoid_bias", num_experts=4, top_k=2, expert_hidden=8,
                     drop_tokens=False, aux_loss_weight=0.0, bias_update_rate=0.1)
    layer.train()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0].fill_(1.0)  # expert 0 favoured for positive tokens
    x = torch.ones(1, 8, 8)
    layer(x, torch.zeros(1, 8), torch.zeros(1))
    load = layer.router.load.clone()
    assert load.sum() == 16 and load[0] == 8  # every token chose expert 0 and one other
    seen = []
    moe.update_router_biases(layer, all_reduce_sum=lambda t: seen.append(t) or 2 * t)
    assert len(seen) == 1
    bias = layer.router.balance_bias
    assert bias[0] == pytest.approx(-0.1) and (bias[load < load.mean()] == pytest.approx(0.1))
    assert layer.router.load.sum() == 0


def test_capacity_schedule():
    layer = layer_of(8, routing="diffmoe", num_experts=8, capacity=1.0, capacity_schedule_stage1=100,
                     capacity_schedule_stage2=300)
    for step, expected in [(0, 8.0), (100, 8.0), (200, 4.5), (300, 1.0), (1000, 1.0)]:
        moe.set_step(layer, step)
        assert layer.capacity == pytest.approx(expected)


def test_dynamic_inference_and_measured_activated_params():
    layer = layer_of(8, routing="diffmoe", num_experts=4, expert_hidden=16)
    x, c, t = random_inputs(4, 16, 8)
    layer.train()
    for _ in range(3):
        layer(x, c, t)  # thresholds become non-zero
    layer.eval()
    per_expert = layer.experts.params_per_expert()
    moe.set_inference(layer, "static")
    moe.reset_meters(layer)
    layer(x, c, t)
    assert layer.measured_activated_params() == pytest.approx(per_expert + layer.router.weight.numel())
    moe.set_inference(layer, "dynamic", threshold_shift=-2.0)  # every prob passes: all tokens, all experts
    moe.reset_meters(layer)
    layer(x, c, t)
    assert layer.stats["experts_per_token"].item() == 4.0
    assert layer.measured_activated_params() == pytest.approx(4 * per_expert + layer.router.weight.numel())
    moe.set_inference(layer, "dynamic", threshold_shift=2.0)  # none passes
    layer(x, c, t)
    assert layer.stats["experts_per_token"].item() == 0.0
    with pytest.raises(ValueError, match="inference"):
        moe.set_inference(layer, "fast")


TINY = ["model.depth=4", "model.hidden_size=32", "model.num_heads=2", "model.input_size=8", "model.in_channels=3",
        "model.num_classes=5", "model.moe.routing=diffmoe", "model.moe.num_experts=4"]


def test_dit_with_moe_slots_trains_and_reports():
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    layers = list(moe.moe_layers(model))
    assert [layer.block_index for layer in layers] == [1, 3]
    x = torch.randn(3, 3, 8, 8)
    out = model(x, torch.rand(3), torch.randint(0, 5, (3,)))
    loss = out.pow(2).mean() + moe.collect_aux_loss(model)
    loss.backward()
    assert all(p.grad is not None for layer in layers for p in layer.experts.parameters())
    stats = moe.collect_stats(model)
    assert stats["moe/layer1/load_by_t"].shape == (4, 10)
    assert stats["moe/layer3/tokens_per_expert"].sum() == 3 * 16
    assert stats["moe/layer1/compute_by_t"].shape == (10,)
    assert math.isfinite(stats["moe/layer3/router_entropy"].item())
    # with capacity 1 the activated params equal a dense FFN's (+ router), below the total
    assert layers[0].activated_params() == sum(p.numel() for p in model.blocks[0].ffn.parameters()) + 4 * 32


def test_activation_checkpointing_updates_thresholds_once():
    cfg_plain = load_config(None, TINY)
    cfg_ckpt = load_config(None, TINY + ["model.grad_checkpointing=true"])
    thresholds = []
    for cfg in (cfg_plain, cfg_ckpt):
        torch.manual_seed(0)
        model = build_model(cfg)
        model.train()
        g = torch.Generator().manual_seed(1)
        out = model(torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, generator=g), torch.tensor([1, 2]))
        (out.pow(2).mean() + moe.collect_aux_loss(model)).backward()
        thresholds.append(torch.cat([layer.predictor.threshold for layer in moe.moe_layers(model)]))
    assert torch.equal(thresholds[0], thresholds[1])


@pytest.mark.parametrize("overrides", [
    ["model.moe.routing=expert_choice", "model.moe.pool=sample", "model.moe.predictor=false"],
    ["model.moe.routing=token_choice", "model.moe.router=sigmoid_bias", "model.moe.top_k=2", "model.moe.activation=swiglu",
     "model.moe.num_shared_experts=1", "model.moe.expert_hidden=16", "model.moe.drop_tokens=false",
     "model.moe.routed_scaling=2.0", "model.position=rope"],
    ["model.moe.routing=token_choice", "model.moe.every=1", "model.moe.top_k=2", "model.moe.activation=swiglu",
     "model.moe.time_aware=true", "model.moe.time_rank=8", "model.moe.recalibration=true", "model.moe.spatial_conv_kernel=5",
     "model.moe.num_shared_experts=2", "model.moe.shared_expert_hidden=32", "model.moe.drop_tokens=false", "model.position=rope"],
])
def test_dit_with_each_moe_design_runs(overrides):
    cfg = load_config(None, TINY[:-2] + ["model.moe.num_experts=4"] + overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    out = model(torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 4]))
    (out.pow(2).mean() + moe.collect_aux_loss(model)).backward()
    moe.update_router_biases(model)
    layers = list(moe.moe_layers(model))
    assert layers and all(layer.stats["tokens_per_expert"].sum() > 0 for layer in layers)
    assert moe.average_activated_params(model) < sum(p.numel() for p in model.parameters())


def test_routing_state_stays_fp32_when_the_model_is_cast_to_bf16():
    layer = layer_of(16, routing="diffmoe", num_experts=4, expert_hidden=16).bfloat16()
    tc = layer_of(16, routing="token_choice", router="sigmoid_bias", num_experts=4, expert_hidden=16).bfloat16()
    assert layer.predictor.threshold.dtype == torch.float32 and layer.experts.w1.dtype == torch.bfloat16
    assert tc.router.balance_bias.dtype == torch.float32 and tc.router.load.dtype == torch.float32
    layer.train()
    x, c, t = random_inputs(2, 8, 16, dtype=torch.bfloat16)
    assert layer(x, c, t).dtype == torch.bfloat16
    assert layer.predictor.threshold.dtype == torch.float32 and layer.predictor.threshold.abs().sum() > 0
