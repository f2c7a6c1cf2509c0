"""Text-to-image: tiny encoders without network, text-conditioned DiT shapes and guidance, caption
dropout to the empty prompt, precomputed == live embeddings, every MoE routing with text, 2-rank
expert-parallel equivalence with text, and the tiny T2I quickstart through engine/train.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, load_config
from engine.rng import per_sample_uniform
from engine.sampling import generate
from engine.text_conditioning import build_text_conditioner, read_prompts
from models import build_model
from models.diffusion import build_diffusion, guided_model_fn
from models.dit import DiT
from models.text import BOS_ID, BYTE_OFFSET, EOS_ID, TextEmbeddings, build_text_encoder, byte_tokenizer
from tests.dist_utils import DistributedPool
from tests.train_utils import REPO, TINY, read_metrics, run_train

torch.set_num_threads(1)

LENGTH = 16
TEXT = ["model.text.encoder=tiny_clip", f"model.text.max_length={LENGTH}", "model.text.dim=16"]
MODEL = ["model.depth=2", "model.hidden_size=32", "model.num_heads=2", "model.input_size=4", "model.in_channels=1",
         "model.num_classes=10"]
CAPTIONS = ["digit seven", "digit one", "zero", "a very long caption that is cut"]


def config(*overrides: str):
    return load_config(None, MODEL + TEXT + list(overrides))


def perturbed_model(cfg, seed: int = 0) -> DiT:
    """A text DiT whose zero-initialised layers are perturbed, so every path changes the output."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def xt(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 4, 4, generator=g), torch.rand(batch, generator=g)


@pytest.fixture(scope="module")
def encoder():
    return build_text_encoder(config().model.text)


# --------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------


def test_byte_tokenizer_ids_padding_and_truncation() -> None:
    out = byte_tokenizer(8)(["ab", "", "abcdefghij"], padding="max_length", truncation=True, max_length=8)
    a, b = BYTE_OFFSET + ord("a"), BYTE_OFFSET + ord("b")
    assert out["input_ids"][0] == [BOS_ID, a, b, EOS_ID, 0, 0, 0, 0]
    assert out["input_ids"][1] == [BOS_ID, EOS_ID, 0, 0, 0, 0, 0, 0]
    assert out["input_ids"][2][0] == BOS_ID and out["input_ids"][2][-1] == EOS_ID  # truncated, still closed
    assert out["attention_mask"][0] == [1, 1, 1, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("kind", ["tiny_clip", "tiny_t5"])
def test_tiny_encoder_builds_offline_deterministic_and_masks_padding(kind, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = config(f"model.text.encoder={kind}").model.text
    rng_before = torch.get_rng_state()
    first, second = build_text_encoder(cfg), build_text_encoder(cfg)
    assert torch.equal(torch.get_rng_state(), rng_before)  # building leaves the global RNG untouched
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), second.parameters()))
    assert not any(p.requires_grad for p in first.parameters())
    emb = first(CAPTIONS + [""])
    assert emb.tokens.shape == (5, LENGTH, 16) and emb.pooled.shape == (5, 16) and emb.mask.dtype == torch.bool
    assert emb.mask.sum(1).tolist() == [min(len(c) + 2, LENGTH) for c in CAPTIONS] + [2]
    assert torch.equal(emb.tokens[~emb.mask], torch.zeros_like(emb.tokens[~emb.mask]))
    assert (emb.tokens[0] - emb.tokens[2]).abs().max() > 1e-3 and (emb.pooled[0] - emb.pooled[2]).abs().max() > 1e-3
    # a caption's embedding does not depend on the rest of its batch
    torch.testing.assert_close(first([CAPTIONS[1]]).tokens[0], emb.tokens[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_pretrained_folder_loads_locally(kind, tmp_path) -> None:
    """A saved tiny encoder + tokenizer is loaded back through from_pretrained(local_files_only)."""
    tiny = build_text_encoder(config(f"model.text.encoder=tiny_{kind}").model.text)
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = build_text_encoder(config(f"model.text.encoder={kind}", f"model.text.path={tmp_path}",
                                       "model.text.dim=0").model.text)
    assert loaded.width == 16
    for got, want in zip(vars(loaded(CAPTIONS)).values(), vars(tiny(CAPTIONS)).values()):
        torch.testing.assert_close(got, want)


def test_missing_encoder_folder_is_a_config_error_naming_the_key(tmp_path) -> None:
    cfg = load_config(None, MODEL + ["model.text.encoder=t5", f"model.text.path={tmp_path}"])
    with pytest.raises(ConfigError, match="model.text.path: .* no config.json"):
        build_text_conditioner(cfg, "cpu")


@pytest.mark.parametrize("overrides,key", [
    (["model.text.encoder=clip"], "model.text.path"),
    (["data.source=imagenet", "data.shards=x"], "data.source"),
    (["model.text.precomputed=true"], "model.text.precomputed"),
    (["model.text.max_length=1"], "model.text.max_length"),
    (["model.text.caption_dropout=1.0"], "model.text.caption_dropout"),
])
def test_config_errors(overrides, key) -> None:
    with pytest.raises(ConfigError, match=key):
        config(*overrides)


# --------------------------------------------------------------------------------------------
# The text-conditioned DiT
# --------------------------------------------------------------------------------------------


def test_shapes_zero_init_and_condition_checks(encoder) -> None:
    text = encoder(CAPTIONS)
    x, t = xt(4)
    torch.manual_seed(0)
    fresh = build_model(config())
    assert torch.equal(fresh(x, t, None, text=text), torch.zeros(4, 1, 4, 4))  # adaLN-Zero + zero cross-attn proj
    assert not hasattr(fresh, "y_embedder")
    model = perturbed_model(config())
    out = model(x, t, None, text=text)
    assert out.shape == (4, 1, 4, 4)
    assert torch.equal(model(x, t, torch.arange(4), text=text), out)  # labels are ignored
    assert (out - model(x, t, None, text=encoder(CAPTIONS[::-1]))).abs().max() > 1e-4  # the caption matters
    sigma = perturbed_model(config("model.learn_sigma=true", "diffusion.objective=ddpm", "diffusion.sampler=ddpm"))
    assert sigma(x, t, None, text=text).shape == (4, 2, 4, 4)
    with pytest.raises(ValueError, match="text-conditioned"):
        model(x, t, torch.arange(4))
    with pytest.raises(ValueError, match="model.text.dim=16"):
        model(x, t, None, text=TextEmbeddings(torch.zeros(4, LENGTH, 8), text.mask, torch.zeros(4, 8)))
    class_model = build_model(load_config(None, MODEL))
    with pytest.raises(ValueError, match="class-conditional"):
        class_model(x, t, torch.arange(4), text=text)


@pytest.mark.parametrize("kernel", ["sdpa", "math"])
def test_padding_tokens_do_not_change_the_output(encoder, kernel) -> None:
    model = perturbed_model(config(f"model.attention={kernel}"))
    text = encoder(CAPTIONS[:2])
    x, t = xt(2)
    noisy = TextEmbeddings(torch.where(text.mask[..., None], text.tokens, torch.randn_like(text.tokens)), text.mask,
                           text.pooled)
    torch.testing.assert_close(model(x, t, None, text=noisy), model(x, t, None, text=text), rtol=0, atol=1e-6)


def test_sdpa_equals_math_and_checkpointing_equals_plain(encoder) -> None:
    text, (x, t) = encoder(CAPTIONS), xt(4)
    ref = perturbed_model(config("model.attention=math"))
    out_ref = ref(x, t, None, text=text)
    for overrides in (["model.attention=sdpa"], ["model.grad_checkpointing=true"]):
        other = perturbed_model(config(*overrides))
        out = other(x, t, None, text=text)
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
        out.square().sum().backward()
    out_ref.square().sum().backward()
    for (name, p), q in zip(ref.named_parameters(), other.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_guidance_with_the_empty_prompt(encoder) -> None:
    model = perturbed_model(config())
    text, null = encoder(CAPTIONS), encoder([""])
    x, t = xt(4)
    cond, uncond = model(x, t, None, text=text), model(x, t, None, text=null.expand_to(4))
    want = uncond + 3.0 * (cond - uncond)
    torch.testing.assert_close(model.forward_with_cfg(x, t, None, 3.0, text=text, null_text=null), want,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided_model_fn(model, None, 3.0, text, null)(x, t), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(guided_model_fn(model, None, 1.0, text, null)(x, t), cond)
    with pytest.raises(ValueError, match="null_text"):
        model.forward_with_cfg(x, t, None, 3.0, text=text)


def test_generate_with_text_is_per_sample(encoder) -> None:
    """A prompt's image depends on its seed only, not on the other prompts of its batch."""
    cfg = config()
    model, objective = perturbed_model(cfg), build_diffusion(cfg)
    text, null = encoder(CAPTIONS), encoder([""])
    both = generate(model, objective, None, [5, 6, 7, 8], 2.0, 3, "euler", text=text, null_text=null)
    one = generate(model, objective, None, [6], 2.0, 3, "euler", text=text[1:2], null_text=null)
    assert both.shape == (4, 1, 4, 4)
    torch.testing.assert_close(one[0], both[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", [
    ["model.moe.routing=diffmoe", "model.moe.time_aware=true", "model.moe.num_shared_experts=1"],
    ["model.moe.routing=token_choice", "model.moe.router=sigmoid_bias"],
    ["model.moe.routing=expert_choice", "model.moe.pool=sample"],
])
def test_every_moe_routing_trains_with_text(encoder, routing) -> None:
    cfg = config("model.moe.num_experts=4", "model.moe.expert_hidden=16", "model.moe.time_rank=4", *routing)
    model = perturbed_model(cfg)
    x, t = xt(4)
    out = model(x, t, None, text=encoder(CAPTIONS))
    from models import moe

    (out.square().mean() + moe.collect_aux_loss(model)).backward()
    assert torch.isfinite(out).all()
    assert model.text_embedder.token_mlp[0].weight.grad.abs().sum() > 0  # the caption path is trained


def test_flops_count_text_projection_and_cross_attention() -> None:
    text_model, class_model = build_model(config()), build_model(load_config(None, MODEL))
    n, d, depth, dt = 4, 32, 2, 16  # tokens (4x4 input, patch 2), width, blocks, text width
    projection = 2 * (LENGTH + 1) * (dt * d + d * d)
    cross = 2 * (n * 2 * d * d + LENGTH * 2 * d * d + 2 * n * LENGTH * d)
    assert text_model.flops_per_sample() - class_model.flops_per_sample() == projection + depth * cross


# --------------------------------------------------------------------------------------------
# Conditioning in the trainer: caption dropout, precomputed embeddings
# --------------------------------------------------------------------------------------------


def micro_batch(captions: list[str], indices: list[int], step: int = 3) -> dict:
    return {"caption": captions, "index": torch.tensor(indices), "step": step, "key": [str(i) for i in indices]}


def test_caption_dropout_uses_the_empty_prompt_per_global_index() -> None:
    cfg = config("model.text.caption_dropout=0.5", "train.seed=4")
    conditioner = build_text_conditioner(cfg, "cpu")
    captions = [f"a handwritten digit {w}" for w in ("zero one two three four five six seven eight nine".split())] * 2
    indices = list(range(len(captions)))
    emb = conditioner.training_text(micro_batch(captions, indices))
    dropped = per_sample_uniform(4, 3, torch.tensor(indices), "label_drop") < 0.5
    assert 0 < int(dropped.sum()) < len(captions)
    live, null = conditioner.encode(captions), conditioner.null(1)
    for i, drop in enumerate(dropped.tolist()):
        want = null[0:1] if drop else live[i:i + 1]
        got = emb[i:i + 1]
        assert torch.equal(got.mask, want.mask)
        torch.testing.assert_close(got.tokens, want.tokens, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.pooled, want.pooled, rtol=1e-5, atol=1e-6)
    # two ranks' halves of the global batch get the same rows
    halves = [conditioner.training_text(micro_batch(captions[s], indices[s])) for s in (slice(0, 10), slice(10, 20))]
    torch.testing.assert_close(TextEmbeddings.cat(halves).tokens, emb.tokens, rtol=1e-5, atol=1e-6)


def test_precomputed_embeddings_equal_live_encoding(tmp_path) -> None:
    """Shards store each caption's real-token states (float16) and pooled vector; the loader pads them."""
    tiny = build_text_encoder(config().model.text)
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    common = ["model.text.encoder=clip", f"model.text.path={tmp_path}", "model.text.caption_dropout=0.0"]
    live = build_text_conditioner(config(*common), "cpu")
    pre = build_text_conditioner(config(*common, "model.text.precomputed=true", "data.source=captions",
                                        "data.shards=unused"), "cpu")
    assert pre.encoder is None  # released after embedding the empty prompt
    want = live.encode(CAPTIONS)
    stored = want.to(dtype=torch.float16).to(dtype=torch.float32)
    batch = micro_batch(CAPTIONS, [0, 1, 2, 3])
    batch.update(text_emb=stored.tokens, text_mask=want.mask, text_pooled=stored.pooled)
    got = pre.training_text(batch)
    assert torch.equal(got.mask, want.mask)
    torch.testing.assert_close(got.tokens, want.tokens, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(pre.null(1).tokens, live.null(1).tokens)
    with pytest.raises(RuntimeError, match="for_sampling=True"):
        pre.encode(["new prompt"])
    sampler = build_text_conditioner(pre.cfg, "cpu", for_sampling=True)  # engine/sample.py keeps the encoder
    torch.testing.assert_close(sampler.encode(CAPTIONS).tokens, want.tokens)


def test_read_prompts(tmp_path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("a handwritten digit one\n\n  a handwritten digit two  \n")
    assert read_prompts(path) == ["a handwritten digit one", "a handwritten digit two"]
    path.write_text("\n")
    with pytest.raises(ValueError, match="no prompt"):
        read_prompts(path)


# --------------------------------------------------------------------------------------------
# Expert parallelism with text: 2 ranks, ep_size 2, pool ep_group == 1 process, pool micro_batch
# --------------------------------------------------------------------------------------------

EP_MODEL = ["model.moe.routing=diffmoe", "model.moe.num_experts=4", "model.moe.expert_hidden=16",
            "model.moe.time_aware=true", "model.moe.time_rank=4"]
PER_RANK = 2


def ep_inputs(world: int) -> dict:
    g = torch.Generator().manual_seed(3)
    rows = world * PER_RANK
    captions = [f"a handwritten digit {w}" for w in ("one", "two", "three", "four")][:rows]
    return {"x": torch.randn(rows, 1, 4, 4, generator=g), "t": torch.rand(rows, generator=g),
            "target": torch.randn(rows, 1, 4, 4, generator=g), "captions": captions}


def ep_run(pool: str, ep_size: int, groups, rows: slice, world: int) -> dict:
    """Forward/backward of this process's `rows` of the 2-rank global batch; `world` processes share it."""
    from models import moe
    from parallel.expert_parallel import attach_expert_parallel

    cfg = config(*EP_MODEL, f"model.moe.pool={pool}", f"parallel.ep_size={ep_size}")
    data = ep_inputs(2)
    text = build_text_encoder(cfg.model.text)(data["captions"][rows])
    torch.manual_seed(0)  # dense weights equal on every rank; experts from their own generators
    model = build_model(cfg, groups.ep_rank if groups else 0, groups.ep_size if groups else 1)
    with torch.no_grad():  # leave the zero init, so gradients reach every parameter
        for name, p in model.named_parameters():
            if p.requires_grad and not getattr(p, "_is_expert", False):
                g = torch.Generator().manual_seed(len(name))
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    if groups is not None:
        attach_expert_parallel(model, cfg, groups)
    out = model(data["x"][rows], data["t"][rows], None, text=text)
    per_sample = (out - data["target"][rows]).square().mean((1, 2, 3))
    loss = per_sample.sum() / (2 * PER_RANK) + moe.collect_aux_loss(model) / world
    loss.backward()
    return {"out": out.detach(), "loss": loss.detach(), "ep_rank": groups.ep_rank if groups else 0,
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            "expert": {n for n, p in model.named_parameters() if getattr(p, "_is_expert", False)}}


def _ep_rank() -> dict:
    import torch.distributed as dist

    from parallel.groups import create_groups

    rank, world = dist.get_rank(), dist.get_world_size()
    return ep_run("ep_group", 2, create_groups(2), slice(rank * PER_RANK, (rank + 1) * PER_RANK), world)


@pytest.mark.slow
def test_two_rank_expert_parallel_equals_one_process_with_text() -> None:
    with DistributedPool(2) as ranks:
        results = ranks.run(_ep_rank)
    ref = ep_run("micro_batch", 1, None, slice(None), 1)
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(torch.cat([r["out"] for r in results]), ref["out"], **tol)
    torch.testing.assert_close(sum(r["loss"] for r in results), ref["loss"], **tol)
    assert any("text_embedder" in n for n in ref["grads"]) and any("cross_attn" in n for n in ref["grads"])
    for name, want in ref["grads"].items():
        if name in ref["expert"]:  # the owner of experts [ep_rank * E/2, (ep_rank + 1) * E/2) holds their rows
            local = want.shape[0] // 2
            for r in results:
                torch.testing.assert_close(r["grads"][name], want[r["ep_rank"] * local:(r["ep_rank"] + 1) * local],
                                           **tol, msg=f"expert gradient {name}")
        else:  # dense: DeepSpeed sums the ranks' shares
            torch.testing.assert_close(sum(r["grads"][name] for r in results), want, **tol, msg=f"dense gradient {name}")


# --------------------------------------------------------------------------------------------
# The tiny T2I quickstart through engine/train.py, then sampling from a prompt file
# --------------------------------------------------------------------------------------------

QUICKSTART_T2I = str(REPO / "configs" / "t2i" / "quickstart_t2i.yaml")


@pytest.mark.slow
def test_tiny_t2i_quickstart_trains_and_samples_from_prompts(tmp_path) -> None:
    run = tmp_path / "run"
    overrides = TINY + [f"train.output_dir={run}", "model.moe.routing=diffmoe", "model.moe.num_experts=4",
                        "model.text.dim=16", "train.sample_every=3", "eval.num_samples=20"]
    run_train(QUICKSTART_T2I, overrides)
    records = read_metrics(run)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and all(v == v and v > 0 for v in losses)
    assert 0.0 <= next(r["eval/class_acc"] for r in records if "eval/class_acc" in r) <= 1.0
    assert (run / "samples" / "step_0000003.png").is_file()

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit three\na handwritten digit eight\n")
    out = tmp_path / "samples"
    proc = subprocess.run([sys.executable, "engine/sample.py", "--run", str(run), "--prompts", str(prompts),
                           "--num-samples", "4", "--steps", "2", "--batch-size", "2", "--out", str(out), "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(result["grid"]).is_file() and result["num_samples"] == 4 and result["tensorboard_step"] == 3
    assert result["prompts"] == ["a handwritten digit three", "a handwritten digit eight"]
    assert len(list((out / "images").glob("*.png"))) == 4
