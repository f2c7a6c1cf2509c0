"""DiT backbone: shapes, adaLN-Zero init, position embeddings, attention kernels, speed paths, sizes."""
from __future__ import annotations

import math

import pytest
import torch

from engine.config import load_config
from models import build_model
from models.attention import Attention, apply_rope_2d, math_attention, rope_2d_tables
from models.dit import DiT, compile_model
from models.embeddings import sincos_2d
from models.ffn import DenseFFN

torch.set_num_threads(1)

TINY = ["model.depth=2", "model.hidden_size=32", "model.num_heads=2", "model.input_size=8",
        "model.in_channels=3", "model.num_classes=5"]


def tiny_model(*overrides: str, seed: int = 0, perturb: bool = True) -> DiT:
    """A tiny DiT; `perturb` replaces the zero init by small random weights so outputs are non-trivial."""
    torch.manual_seed(seed)
    model = build_model(load_config(None, TINY + list(overrides)))
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(model: DiT, batch: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, model.null_class + 1, (batch,), generator=g)
    return x, t, y


@pytest.mark.parametrize("overrides,out_channels", [
    ([], 3),
    (["model.learn_sigma=true", "diffusion.objective=ddpm", "diffusion.sampler=ddpm"], 6),
    (["model.patch_size=4", "model.position=rope"], 3),
    (["model.patch_size=1"], 3),
])
def test_output_shape(overrides: list[str], out_channels: int) -> None:
    model = tiny_model(*overrides)
    x, t, y = inputs(model)
    assert model(x, t, y).shape == (3, out_channels, 8, 8)
    assert model.null_class == 5


def test_zero_init_output_and_gates() -> None:
    model = tiny_model(perturb=False)
    x, t, y = inputs(model)
    assert torch.equal(model(x, t, y), torch.zeros(3, 3, 8, 8))
    c = torch.randn(4, 32)
    for block in model.blocks:
        assert torch.equal(block.adaLN_modulation(c), torch.zeros(4, 6 * 32))  # shifts, scales, gates all 0
    assert not model.pos_embed.requires_grad


def test_wrong_input_shape_names_config_keys() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="model.in_channels, model.input_size"):
        model(torch.zeros(1, 3, 16, 16), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_sincos_position_embedding_matches_hand_formula() -> None:
    d, grid = 16, 4
    table = sincos_2d(d, grid)
    for row, col in [(0, 0), (1, 2), (3, 1)]:
        token = row * grid + col
        for k in range(d // 4):
            omega = 1.0 / 10000 ** (k / (d // 4))
            assert table[token, k] == pytest.approx(math.sin(col * omega), abs=1e-12)
            assert table[token, d // 4 + k] == pytest.approx(math.cos(col * omega), abs=1e-12)
            assert table[token, d // 2 + k] == pytest.approx(math.sin(row * omega), abs=1e-12)
            assert table[token, 3 * d // 4 + k] == pytest.approx(math.cos(row * omega), abs=1e-12)
    model = tiny_model(perturb=False)
    assert torch.allclose(model.pos_embed[0], sincos_2d(32, 4).float())


def test_rope_head_dim_4_is_a_plain_rotation_per_axis() -> None:
    # D = 4: one frequency (1.0) per axis; channels (0, 1) rotate by the row, (2, 3) by the column
    cos, sin = rope_2d_tables(3, 3, 4)
    q = torch.tensor([1.0, 0.0, 0.0, 1.0]).expand(9, 4)
    rotated = apply_rope_2d(q, (cos, sin))
    for row in range(3):
        for col in range(3):
            expect = torch.tensor([math.cos(row), math.sin(row), -math.sin(col), math.cos(col)])
            assert torch.allclose(rotated[row * 3 + col], expect, atol=1e-6)


def test_rope_preserves_norms_and_scores_depend_on_relative_offset() -> None:
    grid, dim = 5, 16
    tables = rope_2d_tables(grid, grid, dim)
    g = torch.Generator().manual_seed(0)
    q0, k0 = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    q = apply_rope_2d(q0.expand(grid * grid, dim), tables)
    k = apply_rope_2d(k0.expand(grid * grid, dim), tables)
    assert torch.allclose(q.norm(dim=-1), q0.norm().expand(grid * grid), atol=1e-5)
    scores = q @ k.t()

    def score(a: tuple[int, int], b: tuple[int, int]) -> float:
        return float(scores[a[0] * grid + a[1], b[0] * grid + b[1]])

    # the same (row, column) offset anywhere on the grid gives the same score
    assert score((0, 0), (1, 2)) == pytest.approx(score((3, 2), (4, 4)), abs=1e-4)
    assert score((2, 3), (0, 1)) == pytest.approx(score((4, 4), (2, 2)), abs=1e-4)
    assert score((1, 1), (1, 1)) == pytest.approx(float(q0 @ k0), abs=1e-4)
    assert score((0, 0), (1, 2)) != pytest.approx(score((0, 0), (2, 1)), abs=1e-3)  # y and x are distinct axes


@pytest.mark.parametrize("rope", [False, True])
def test_sdpa_equals_math_attention(rope: bool) -> None:
    torch.manual_seed(0)
    attn_sdpa = Attention(32, 4, kernel="sdpa")
    attn_math = Attention(32, 4, kernel="math")
    attn_math.load_state_dict(attn_sdpa.state_dict())
    x = torch.randn(2, 16, 32)
    tables = rope_2d_tables(4, 4, 8) if rope else None
    assert torch.allclose(attn_sdpa(x, tables), attn_math(x, tables), atol=1e-5)
    # the math kernel is the textbook formula
    q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)
    weights = torch.exp(q @ k.transpose(-1, -2) / 2.0)
    assert torch.allclose(math_attention(q, k, v), (weights / weights.sum(-1, keepdim=True)) @ v, atol=1e-6)


def test_math_kernel_model_equals_sdpa_model() -> None:
    model_sdpa = tiny_model("model.position=rope")
    model_math = tiny_model("model.position=rope", "model.attention=math")
    x, t, y = inputs(model_sdpa)
    assert torch.allclose(model_sdpa(x, t, y), model_math(x, t, y), atol=1e-5)


def test_grad_checkpointing_matches_plain_values_and_grads() -> None:
    plain = tiny_model("model.learn_sigma=true", "diffusion.objective=ddpm", "diffusion.sampler=ddpm")
    ckpt = tiny_model("model.learn_sigma=true", "diffusion.objective=ddpm", "diffusion.sampler=ddpm",
                      "model.grad_checkpointing=true")
    x, t, y = inputs(plain)
    out_plain, out_ckpt = plain(x, t, y), ckpt(x, t, y)
    assert torch.allclose(out_plain, out_ckpt, atol=1e-6)
    out_plain.square().mean().backward()
    out_ckpt.square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        if a.requires_grad:
            assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_forward_with_cfg_guides_first_channels_and_keeps_conditional_sigma() -> None:
    model = tiny_model("model.learn_sigma=true", "diffusion.objective=ddpm", "diffusion.sampler=ddpm")
    x, t, y = inputs(model)
    y = y.clamp(max=4)
    cond = model(x, t, y)
    uncond = model(x, t, torch.full_like(y, model.null_class))
    guided = model.forward_with_cfg(x, t, y, 4.0)
    assert torch.allclose(guided[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]), atol=1e-5)
    assert torch.allclose(guided[:, 3:], cond[:, 3:], atol=1e-6)


def test_bf16_autocast_runs_close_to_fp32() -> None:
    model = tiny_model("model.position=rope")
    x, t, y = inputs(model)
    reference = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert out.dtype == torch.bfloat16
    assert (out.float() - reference).abs().max() < 0.05 * reference.abs().max()


@pytest.mark.slow
def test_compiled_blocks_equal_eager() -> None:
    eager = tiny_model()
    compiled = compile_model(tiny_model())
    x, t, y = inputs(eager)
    assert torch.allclose(eager(x, t, y), compiled(x, t, y), atol=1e-5)
    assert list(dict(compiled.named_parameters())) == list(dict(eager.named_parameters()))


def size_config(size: str, *extra: str):
    depth, width, heads = {"S": (12, 384, 6), "B": (12, 768, 12)}[size]
    return load_config(None, [f"model.depth={depth}", f"model.hidden_size={width}", f"model.num_heads={heads}",
                              "model.learn_sigma=true", "diffusion.objective=ddpm", "diffusion.sampler=ddpm", *extra])


@pytest.mark.parametrize("size,millions", [("S", 32.96), ("B", 130.51)])
def test_dense_parameter_count_matches_reference(size: str, millions: float) -> None:
    with torch.device("meta"):
        model = build_model(size_config(size))
    total = sum(p.numel() for p in model.parameters())
    assert abs(total / 1e6 - millions) / millions < 1e-3


def test_meta_device_construction_with_rope_and_compile_flag() -> None:
    with torch.device("meta"):
        model = build_model(size_config("S", "model.position=rope", "model.compile=true", "model.grad_checkpointing=true"))
    assert all(p.is_meta for p in model.parameters())
    assert not hasattr(model, "pos_embed")


def test_flops_per_sample() -> None:
    # DiT-S/2 at 256 tokens: the DiT paper's 6.06 GFLOPs are multiply-accumulates
    with torch.device("meta"):
        model = build_model(size_config("S"))
    assert model.flops_per_sample() / 2 / 1e9 == pytest.approx(6.06, abs=0.01)
    # tiny model by hand: N = 16 tokens, d = 32, p = 2, C = 3, C_out = 3, FFN 32 -> 128 -> 32
    tiny = tiny_model(perturb=False)
    n, d = 16, 32
    ffn_params = 32 * 128 + 128 + 128 * 32 + 32
    assert tiny.blocks[0].ffn.activated_params() == ffn_params
    per_block = 6 * d * d + n * (3 * d * d + d * d) + 2 * n * n * d + n * ffn_params
    macs = n * 3 * 4 * d + (256 * d + d * d) + 2 * per_block + 2 * d * d + n * d * 4 * 3
    assert tiny.flops_per_sample() == 2 * macs


def test_dense_init_is_deterministic_and_independent_of_ep_layout() -> None:
    a = tiny_model(perturb=False)
    torch.manual_seed(0)
    b = DiT(load_config(None, TINY).model, ep_rank=1, ep_size=2)  # dense: no experts to shard
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert isinstance(a.blocks[1].ffn, DenseFFN)


def test_build_model_compiles_blocks_when_configured() -> None:
    model = build_model(load_config(None, TINY + ["model.compile=true"]))
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert tiny_model(perturb=False).blocks[0]._compiled_call_impl is None
