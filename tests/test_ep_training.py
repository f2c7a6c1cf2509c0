"""Expert parallelism through DeepSpeed ZeRO, on real gloo ranks:

- `deepspeed --num_gpus 2 engine/train.py ... parallel.ep_size=2 model.moe.pool=ep_group` (ZeRO-2)
  logs the per-step losses of the 1-rank run with pool `micro_batch` (metrics.jsonl, 1e-5 relative);
- world 4, ep_size 2, ZeRO-1, pool `world`: after a few DeepSpeed steps every parameter equals a
  plain one-process torch run's (experts on their owners), experts are identical across their expert-data-parallel
  replicas and differ across EP ranks, dense parameters are identical on all ranks;
- ZeRO-3 with ep_size > 1 stops at start-up with a message saying why.
"""
from __future__ import annotations


import pytest
import torch

from engine.config import load_config
from tests.dist_utils import DistributedPool
from tests.train_utils import QUICKSTART, TINY, losses_by_step, run_train

MOE = ["model.moe.routing=diffmoe", "model.moe.num_experts=4", "model.moe.every=1", "train.lr=0.001"]


@pytest.mark.slow
def test_two_rank_ep_run_logs_the_one_rank_losses(tmp_path):
    common = TINY + MOE + ["train.max_steps=3"]
    run_train(QUICKSTART, common + ["model.moe.pool=micro_batch", f"train.output_dir={tmp_path / 'one'}"])
    run_train(QUICKSTART, common + ["parallel.ep_size=2", "model.moe.pool=ep_group", "parallel.zero_stage=2",
                                    f"train.output_dir={tmp_path / 'ep'}"], nproc=2)
    reference, ep = losses_by_step(tmp_path / "one"), losses_by_step(tmp_path / "ep")
    assert list(reference) == [1, 2, 3] and ep.keys() == reference.keys()
    for step, loss in reference.items():
        assert ep[step] == pytest.approx(loss, rel=1e-5), step
    metrics = (tmp_path / "ep" / "metrics.jsonl").read_text()
    assert '"comm/alltoall_bytes"' in metrics and '"comm/metadata_bytes"' in metrics


STEPS, GLOBAL_BATCH = 3, 8


def tiny_config(overrides: list[str]):
    return load_config(QUICKSTART, TINY + MOE + [f"train.global_batch_size={GLOBAL_BATCH}", "train.warmup_steps=2"] + overrides)


def step_loss(model, step: int, rows: slice) -> torch.Tensor:
    """Step `step`'s loss on samples `rows` of its global batch: flow-like MSE + the MoE aux losses."""
    from models import moe

    g = torch.Generator().manual_seed(step)
    x = torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=g)
    t, target = torch.rand(GLOBAL_BATCH, generator=g), torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=g)
    y = torch.arange(GLOBAL_BATCH) % 10
    out = model(x[rows], t[rows], y[rows])
    return ((out - target[rows]) ** 2).mean() + moe.collect_aux_loss(model)


def _deepspeed_steps(overrides: list[str]) -> dict:
    """A few DeepSpeed steps of the tiny MoE DiT, built the way engine/train.py builds it."""
    from models import build_model
    from parallel.expert_parallel import attach_expert_parallel, optimizer_param_groups
    from parallel.groups import create_groups
    from parallel.zero import batch_layout, init_distributed, initialize_engine

    cfg = tiny_config(overrides)
    ctx = init_distributed(cfg)
    groups = create_groups(cfg.parallel.ep_size)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, groups.ep_rank, groups.ep_size)
    attach_expert_parallel(model, cfg, groups)
    mb, accum = batch_layout(cfg, ctx.world_size)
    engine = initialize_engine(model, optimizer_param_groups(model, cfg), cfg, mb, accum, ctx)
    losses = []
    for step in range(STEPS):
        loss = step_loss(engine, step, slice(ctx.rank * mb, (ctx.rank + 1) * mb))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return {"losses": losses, "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "ep_rank": groups.ep_rank}


def one_process_steps() -> dict:
    """The reference: plain torch, one process, the whole batch, pool micro_batch, same AdamW + warm-up."""
    from models import build_model
    from parallel.zero import build_optimizer, warmup_schedule

    cfg = tiny_config(["model.moe.pool=micro_batch"])
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    optimizer = build_optimizer([{"params": list(model.parameters())}], cfg, torch.device("cpu"))
    schedule = warmup_schedule(optimizer, cfg.train.warmup_steps)
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = step_loss(model, step, slice(None))
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    experts = {n for n, p in model.named_parameters() if getattr(p, "_is_expert", False)}
    return {"losses": losses, "params": {n: p.detach().clone() for n, p in model.named_parameters()}, "experts": experts}


@pytest.mark.slow
def test_world4_ep2_deepspeed_steps_match_one_process_and_keep_replicas_in_sync():
    with DistributedPool(4) as four:
        ranks = four.run(_deepspeed_steps, ["parallel.ep_size=2", "model.moe.pool=world", "parallel.zero_stage=1"])
    ref = one_process_steps()

    for step in range(STEPS):
        mean_loss = sum(r["losses"][step] for r in ranks) / 4
        assert mean_loss == pytest.approx(ref["losses"][step], rel=1e-5), step
    assert ref["experts"] and ranks[0]["params"].keys() == ref["params"].keys()
    for name, want in ref["params"].items():
        if name in ref["experts"]:
            local = want.shape[0] // 2
            for r in ranks:
                mine = want[r["ep_rank"] * local:(r["ep_rank"] + 1) * local]
                torch.testing.assert_close(r["params"][name], mine, rtol=1e-5, atol=1e-6, msg=name)
            # ranks 0, 2 hold experts 0-1 and ranks 1, 3 experts 2-3
            assert torch.equal(ranks[0]["params"][name], ranks[2]["params"][name]), name
            assert torch.equal(ranks[1]["params"][name], ranks[3]["params"][name]), name
            assert not torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
        else:
            torch.testing.assert_close(ranks[0]["params"][name], want, rtol=1e-5, atol=1e-6, msg=name)
            assert all(torch.equal(r["params"][name], ranks[0]["params"][name]) for r in ranks), name
