"""A tiny MoE DiT on a real DeepSpeed ZeRO engine, built the trainer's way, for the checkpoint tests.

    cfg, engine, ema = build_engine(["parallel.ep_size=2"])   # inside a rank (tests.dist_utils) or a process
    loss = train_step(engine, ema, step)
    state = reference_state(engine, ema)   # whole tensors through DeepSpeed's own API (after a step)
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

# 2 blocks (block 1 is DiffMoE with 4 experts), 16 tokens per 8x8 image, 4 images per step.
TINY_MOE = [
    "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "model.input_size=8", "model.in_channels=3",
    "model.num_classes=5", "model.moe.routing=diffmoe", "model.moe.num_experts=4", "model.moe.every=2",
    "model.moe.pool=micro_batch", "train.global_batch_size=4", "train.warmup_steps=3", "train.lr=0.001",
    "train.ema_decay=0.9", "train.weight_decay=0.01", "parallel.backend=gloo",
]


def build_engine(overrides: list[str], seed: int = 0):
    """(cfg, DeepSpeed engine, EMA) as engine/train.py builds them."""
    from engine.config import load_config
    from engine.ema import EMA
    from models import build_model
    from parallel.expert_parallel import attach_expert_parallel, optimizer_param_groups
    from parallel.groups import create_groups
    from parallel.zero import batch_layout, init_distributed, initialize_engine

    cfg = load_config(None, TINY_MOE + overrides)
    ctx = init_distributed(cfg)
    torch.set_num_threads(1)
    groups = create_groups(cfg.parallel.ep_size)
    torch.manual_seed(seed)
    model = build_model(cfg, groups.ep_rank, groups.ep_size)
    attach_expert_parallel(model, cfg, groups)
    mb, accum = batch_layout(cfg, ctx.world_size)
    engine = initialize_engine(model, optimizer_param_groups(model, cfg), cfg, mb, accum, ctx)
    return cfg, engine, EMA(engine.module)


def train_step(engine, ema, step: int) -> float:
    """One optimizer step on a random regression batch (different on every rank and step), then the EMA."""
    from models import moe

    g = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    mb = engine.train_micro_batch_size_per_gpu()
    x = torch.randn(mb, 3, 8, 8, generator=g)
    t = torch.rand(mb, generator=g)
    y = torch.randint(0, 5, (mb,), generator=g)
    target = torch.randn(mb, 3, 8, 8, generator=g)
    dtype = next(engine.module.parameters()).dtype  # bf16 when train.precision=bf16
    loss = (engine(x.to(dtype), t, y).float() - target).pow(2).mean() + moe.collect_aux_loss(engine.module)
    engine.backward(loss)
    engine.step()
    ema.update(engine.module, 0.9)
    return loss.item()


def reference_state(engine, ema) -> dict[str, torch.Tensor]:
    """Every tensor a resume must restore, read through DeepSpeed's own accessors (valid after a step):
    model tensors, fp32 master weights, Adam moments and step, EMA, learning rates, step counters."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    # DeepSpeed 0.19 links its moment views once, inside the first step of param group 0, before the
    # expert group has any state; link again so its accessor can serve as the reference for every group.
    engine.optimizer._hp_optimizer_states_linked = False
    engine.optimizer._lazy_init_hp_params_optimizer_state()

    def full(t: torch.Tensor, key: str | None) -> torch.Tensor | None:
        if not (isinstance(t, torch.nn.Parameter) and t.requires_grad):
            return None
        return (safe_get_full_fp32_param(t) if key is None else safe_get_full_optimizer_state(t, key)).cpu()

    return state_snapshot(engine, ema, full)


def state_snapshot(engine, ema, full: Callable[[torch.Tensor, str | None], torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """The tensors of `reference_state`, with whole master weights (`key` None) and Adam moments read by
    `full(param, key)` (None for a tensor the optimizer does not manage)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in engine.module.state_dict(keep_vars=True).items():
        out[f"model/{name}"] = t.detach().cpu().clone()
        if (master := full(t, None)) is not None:
            out[f"master/{name}"] = master
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{key}/{name}"] = full(t, key)
    out.update({f"ema/{k}": v.cpu().clone() for k, v in ema.state_dict().items()})
    base = engine.optimizer.optimizer
    out["adam_step"] = torch.tensor([float(base.state[p]["step"]) for g in base.param_groups for p in g["params"]])
    out["lr"] = torch.tensor([g["lr"] for g in engine.optimizer.param_groups])
    out["counters"] = torch.tensor([engine.global_steps, engine.global_samples, engine.micro_steps])
    return out


def mismatches(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Keys missing on one side or not bit-for-bit equal."""
    keys = sorted(set(a) | set(b))
    return [k for k in keys if k not in a or k not in b or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]


@torch.no_grad()
def gathered(zero, param: torch.Tensor, key: str | None) -> torch.Tensor:
    """The whole fp32 master weight (`key` None) or moment `key` of `param`, summed from the ranks' ZeRO
    pieces over its data-parallel group (each element lives in one piece: the sum adds zeros only).
    Collective over that group. A test reference for engines before their first step, where DeepSpeed's
    own accessors do not work."""
    full = torch.zeros(param.numel(), dtype=torch.float32)
    fragment = zero.fragment(param)
    if fragment is not None:
        full.narrow(0, fragment[0], fragment[1]).copy_(zero.view(param, key))
    dist.all_reduce(full, group=param._dp_group)
    return full.view(param.shape)


def save_then_die(run_dir: str, point: str) -> None:
    """Save step 1, train a step, then die by SIGKILL in the middle of saving step 2:
    `write` (a torn, half-written rank file), `publish` (all files written, folder not yet renamed) or
    `pointer` (folder renamed, `latest` not yet updated). Step 1's model state goes to expected_step1.pt."""
    import os
    import signal
    from pathlib import Path

    import parallel.checkpoint.files as files
    from parallel.checkpoint import save_checkpoint

    root = Path(run_dir) / "checkpoints"
    cfg, engine, ema = build_engine([f"train.output_dir={run_dir}"])
    train_step(engine, ema, 1)
    save_checkpoint(root, 1, engine, ema, {"step": 1}, cfg)
    step1 = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    torch.save(step1, Path(run_dir) / "expected_step1.pt")
    train_step(engine, ema, 2)

    def die(*args, **kwargs) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def torn_write(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> None:
        path.write_bytes(b"\0" * 1000)  # the first bytes of a file that is never finished
        die()

    if point == "write":
        files.write_safetensors = torn_write
    elif point == "publish":
        files.publish_dir = die
    elif point == "pointer":
        files.write_pointer = die
    else:
        raise ValueError(point)
    save_checkpoint(root, 2, engine, ema, {"step": 2}, cfg)
    raise AssertionError("the save was expected to be killed")


def whole_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor saved in checkpoint folder `path`, whole: "section/name" -> the global tensor."""
    from parallel.checkpoint import CheckpointReader, read_manifest

    manifest = read_manifest(path)
    with CheckpointReader(path, manifest) as reader:
        keys = sorted({key for rec in manifest["files"].values() for key in rec["pieces"]})
        return {key: reader.tensor(key).clone() for key in keys}
