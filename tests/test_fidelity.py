"""Paper fidelity (docs/fidelity.md): each point where our layers once differed from a reference,
checked against an independent reference — a hand-computed case, a separate forward, or the
reference's formula."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.config import ConfigError, ModelConfig, MoEConfig, load_config
from engine.ema import EMA
from models import build_model
from models.diffusion import DDPM, build_diffusion, guided_model_fn
from models.dit import modulate
from models.embeddings import TimestepEmbedder
from models.moe import init, moe_layers
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


# ------------------------------------------------------------------ 2. CFG: separate cond / uncond pools
TINY_DIFFMOE = ["model.depth=2", "model.hidden_size=16", "model.num_heads=2", "model.input_size=4", "model.in_channels=4",
                "model.num_classes=3", "model.moe.routing=diffmoe", "model.moe.num_experts=4", "model.moe.capacity=1.0"]


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Small random weights instead of the zero init, so outputs and routing are non-trivial."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("inference", ["static", "dynamic"])
def test_cfg_with_separate_pools_equals_two_separate_forwards(inference):
    model = perturbed(build_model(load_config(None, TINY_DIFFMOE + [f"model.moe.inference={inference}"])))
    with torch.no_grad():  # labels that move the tokens far: cond and uncond tokens compete in a joint pool
        model.y_embedder.embedding_table.weight.mul_(20.0)
        for layer in moe_layers(model):  # dynamic: a threshold some predictions pass and some do not
            layer.predictor.threshold.fill_(0.5)
    x, t, y = torch.randn(3, 4, 4, 4), torch.rand(3), torch.tensor([0, 2, 1])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, model.null_class))
        assert model.cfg.moe.cfg_pool == "separate"
        guided = model.forward_with_cfg(x, t, y, 3.0)
        assert torch.equal(guided, uncond + 3.0 * (cond - uncond))
        # joint pooling (an option): one forward over [cond; uncond], whose routing differs
        model.cfg.moe.cfg_pool = "joint"
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, model.null_class)]))
        joint_cond, joint_uncond = both.chunk(2)
        assert torch.equal(model.forward_with_cfg(x, t, y, 3.0), joint_uncond + 3.0 * (joint_cond - joint_uncond))
        assert not torch.allclose(joint_cond, cond, atol=1e-4)


def test_diffmoe_ddpm_configs_pool_cfg_jointly_as_their_reference_sampler():
    for path in sorted(CONFIGS.glob("diffmoe_*.yaml")):
        cfg = load_config(path)
        expected = "joint" if cfg.diffusion.objective == "ddpm" else "separate"
        assert cfg.model.moe.cfg_pool == expected, path.name


# ------------------------------------------------------------------------------ 3. flow time scale
FREQS = torch.tensor([1.0, 10000.0 ** -0.5])  # frequency_dim 4: f_i = 10000^(-i / 2)


def sinusoids(s: torch.Tensor) -> torch.Tensor:
    args = s.double()[:, None] * FREQS.double()[None]
    return torch.cat([args.cos(), args.sin()], dim=1).float()


def test_timestep_features_follow_time_scale_and_offset():
    t = torch.tensor([0.5, 0.25])
    for offset, scale in ((0.0, 1.0), (0.0, 1000.0), (1.0, -1.0)):
        features = TimestepEmbedder(8, frequency_dim=4, time_scale=scale, time_offset=offset).frequency_features(t)
        assert torch.allclose(features, sinusoids(offset + scale * t), atol=1e-6)


def test_paper_configs_embed_their_references_time_variable():
    """DDPM rows embed DiT's step index n, the DiffMoE / recipe flow rows raw t, the Diff-MoE flow
    rows their 1 - t (their t = 1 is noise)."""
    ddpm, n = DDPM(1000), torch.tensor([0, 1, 500, 998, 999])
    t_flow = torch.tensor([0.0, 0.3, 1.0])
    for path in sorted(CONFIGS.glob("*.yaml")):
        m = load_config(path).model
        embedder = TimestepEmbedder(8, frequency_dim=4, time_scale=m.time_scale, time_offset=m.time_offset)
        if load_config(path).diffusion.objective == "ddpm":
            got, want = embedder.frequency_features(ddpm.time_of_step(n)), sinusoids(n.double())
        else:
            reference_t = 1 - t_flow if path.name.startswith("diff_moe_") else t_flow
            got, want = embedder.frequency_features(t_flow), sinusoids(reference_t)
        assert torch.allclose(got, want, atol=2e-3), path.name  # fp32 t: 999 - 1000 t within ~1e-4
    tiny = build_model(load_config(None, TINY_DIFFMOE + ["model.time_scale=-1.0", "model.time_offset=1.0"]))
    assert (tiny.t_embedder.time_scale, tiny.t_embedder.time_offset) == (-1.0, 1.0)


# ------------------------------------------------------------------------ 4. EMA'd thresholds
def test_ema_model_carries_ema_thresholds_equal_to_the_closed_form():
    """The live threshold after step i is thr_i; the EMA after n steps (shadow_0 = thr_0 = 0) is
    sum_i (1 - d) d^(n - i) thr_i, and sampling under `applied_to` sees it, not the live value."""
    model = build_model(load_config(None, TINY_DIFFMOE))
    ema, decay, live = EMA(model), 0.9, []
    name = "blocks.1.ffn.predictor.threshold"
    model.train()
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        model(torch.randn(4, 4, 4, 4, generator=g), torch.rand(4, generator=g), torch.randint(0, 3, (4,), generator=g))
        ema.update(model, decay)
        live.append(model.state_dict()[name].clone())
    n = len(live)
    closed = sum((1 - decay) * decay ** (n - 1 - i) * thr for i, thr in enumerate(live))
    assert torch.allclose(ema.shadow[name], closed, atol=1e-7)
    assert not torch.allclose(closed, live[-1], atol=1e-4)
    with ema.applied_to(model):
        assert torch.equal(model.blocks[1].ffn.predictor.threshold, ema.shadow[name])
    assert torch.equal(model.blocks[1].ffn.predictor.threshold, live[-1])


# ------------------------------------------------------------------------- 5. DDPM guided channels
@pytest.mark.parametrize("objective, channels, guided", [
    ("ddpm", "auto", 3), ("ddpm", "all", 4), ("ddpm", "first3", 3), ("flow", "auto", 4), ("flow", "first3", 3)])
def test_guidance_channels(objective, channels, guided):
    sampler, sigma = ("ddpm", "true") if objective == "ddpm" else ("euler", "false")
    cfg = load_config(None, TINY_DIFFMOE + ["model.moe.routing=dense", f"diffusion.objective={objective}",
                                           f"diffusion.sampler={sampler}", f"model.learn_sigma={sigma}",
                                           f"diffusion.cfg_channels={channels}"])
    model, diffusion = perturbed(build_model(cfg)), build_diffusion(cfg)
    x, t, y = torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([0, 2])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, model.null_class))
        out = guided_model_fn(model, y, 2.0, guided_channels=diffusion.guided_channels)(x, t)
    want = torch.cat([uncond[:, :guided] + 2.0 * (cond[:, :guided] - uncond[:, :guided]), cond[:, guided:]], dim=1)
    assert out.shape == cond.shape and torch.allclose(out, want, atol=1e-5)


# ------------------------------------------------------------------------------- 6. router init
@pytest.mark.parametrize("config, scheme", [
    ("diffmoe_s_e16_flow", "normal"), ("ec_dit_s_e16_flow", "normal"), ("tc_dit_s_e16_flow", "kaiming_uniform"),
    ("diff_moe_s_e8_flow", "kaiming_uniform"), ("recipe_s_e16_flow", "kaiming_normal")])
def test_router_init_is_each_references(config, scheme):
    cfg = load_config(CONFIGS / f"{config}.yaml", ["parallel.ep_size=1", "model.depth=2"])
    router = MoELayer(cfg.model, block_index=1).router
    assert router.init_scheme == scheme
    gen, want = init.init_generator(1, "router"), torch.empty(router.weight.shape)
    if scheme == "normal":
        torch.nn.init.normal_(want, std=0.006, generator=gen)
    elif scheme == "kaiming_uniform":  # torch.nn.Linear's (and the references' MoEGate) init
        torch.nn.init.kaiming_uniform_(want, a=math.sqrt(5), generator=gen)
    else:
        torch.nn.init.kaiming_normal_(want, generator=gen)
    assert torch.allclose(router.weight, want, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------- 7. Diff-MoE per-expert adaLN
def diff_moe_layer(*overrides: str) -> MoELayer:
    cfg = load_config(CONFIGS / "diff_moe_s_e8_flow.yaml", ["parallel.ep_size=1", *overrides])
    return MoELayer(cfg.model, block_index=1)


def test_diff_moe_adaln_and_recalibration_start_at_xavier():
    layer, d = diff_moe_layer(), 384
    rank = layer.experts.ada_down.shape[-1]
    for bank in (layer.experts, layer.shared.ffn):
        for weight, fan_in, fan_out in ((bank.ada_down, d, rank), (bank.ada_up, rank, 3 * d)):
            bound = math.sqrt(6.0 / (fan_in + fan_out))  # xavier-uniform
            assert weight.abs().max() <= bound and weight.abs().max() > 0.99 * bound
            assert abs(weight.std().item() - bound / math.sqrt(3)) < 0.02 * bound
        assert not bank.ada_up_bias.any()
    recal = layer.recalibration
    for lin in (recal.down, recal.up):
        bound = math.sqrt(6.0 / (lin.in_features + lin.out_features))
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.99 * bound
    zero = diff_moe_layer("model.moe.expert_adaln_init=zero")
    assert not zero.experts.ada_up.any() and not zero.shared.ffn.ada_up.any()


# ------------------------------------------------------------------------------------------ 9. VAE
def test_latent_configs_and_docs_name_the_ft_mse_vae():
    root = CONFIGS.parents[1]
    texts = [p.read_text() for p in sorted((root / "configs").rglob("*.yaml"))] + [(root / "docs" / "data.md").read_text()]
    assert not any("ft-ema" in text for text in texts)
    assert all("sd-vae-ft-mse" in text for text in texts if "latent: true" in text)


def test_diff_moe_block_convolves_the_stream_before_the_moe_norm():
    """The reference block: x + gate * moe(modulate(norm2(dwconv(x)))), residual on the un-convolved x."""
    cfg = load_config(None, TINY_DIFFMOE + ["model.moe.routing=token_choice", "model.moe.spatial_conv_kernel=3",
                                           "model.moe.time_aware=true", "model.moe.time_rank=4"])
    block = perturbed(build_model(cfg)).blocks[1]
    x, c, t = torch.randn(2, 4, 16), torch.randn(2, 16), torch.rand(2)
    with torch.no_grad():
        shift_msa, scale_msa, gate_msa, shift, scale, gate = block.adaLN_modulation(c).chunk(6, dim=1)
        x1 = x + gate_msa.unsqueeze(1) * block.attn(modulate(block.norm1(x), shift_msa, scale_msa))
        grid = F.conv2d(x1.transpose(1, 2).reshape(2, 16, 2, 2), block.spatial.conv.weight, block.spatial.conv.bias,
                        padding=1, groups=16).reshape(2, 16, 4).transpose(1, 2)
        want = x1 + gate.unsqueeze(1) * block.ffn(modulate(block.norm2(grid), shift, scale), c, t)
        assert torch.allclose(block(x, c, t), want, atol=1e-5)


def test_recipe_dense_blocks_use_silu():
    cfg = load_config(CONFIGS / "recipe_s_e16_flow.yaml", ["parallel.ep_size=1", "model.depth=2", "model.hidden_size=16",
                                                            "model.num_heads=2", "model.moe.expert_hidden=8"])
    dense = build_model(cfg).blocks[0].ffn
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        assert torch.allclose(dense(x), dense.fc2(F.silu(dense.fc1(x))), atol=1e-6)


def test_zero_time_scale_is_a_config_error():
    with pytest.raises(ConfigError, match="model.time_scale"):
        load_config(None, ["model.time_scale=0"])
