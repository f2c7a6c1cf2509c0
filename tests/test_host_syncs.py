"""The GPU cost model of the MoE hot path (DESIGN.md), counted on CPU: device->host syncs and
collectives of one MoE layer's training forward and backward, for every routing, at EP = 1, 2, 4;
the payload all-to-all overlaps the shared experts."""
from __future__ import annotations

import pytest
import torch

from benchmarks.host_syncs import ROUTINGS, SyncCounter, all_routings, measure_layer, meets_targets, sync_target


def test_counter_counts_what_syncs_on_cuda_and_nothing_else():
    x = torch.randn(6, 4)
    mask = x > 0
    with SyncCounter() as counter:
        # each of these reads device data on the host
        x.sum().item()
        x[0].tolist()
        bool(x.sum() > 0)
        int(x.argmax())
        float(x.max())
        torch.nonzero(mask)
        torch.bincount(mask.flatten().long())
        torch.unique(mask)
        torch.masked_select(x, mask)
        x[mask]
        x.repeat_interleave(torch.tensor([1, 2, 0, 1, 1, 1]), dim=0)
        torch.where(mask)
        synced = counter.count
        # these do not: shapes are known without looking at the data
        x.topk(2, dim=0)
        x.cumsum(0)
        torch.where(mask, x, 0.0)
        x.index_select(0, torch.tensor([0, 2]))
        torch.zeros(6).index_add_(0, torch.tensor([0, 0, 1, 2, 3, 5]), torch.ones(6))
        x.repeat_interleave(torch.tensor([1, 2, 0, 1, 1, 1]), dim=0, output_size=6)
        x.repeat_interleave(2, dim=0)
        x[torch.tensor([0, 1])]
    assert synced == 12
    assert counter.count == 12, counter.by_op


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_single_process_layer_needs_no_host_sync(routing):
    row = measure_layer(routing, 1, 16)
    assert row["syncs_forward"] == sync_target(routing, 1), row["sync_ops"]
    assert row["syncs_backward"] == 0, row["sync_ops"]
    assert row["collectives_forward"] == row["collectives_backward"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("world,ep_size", [(2, 2), (4, 4), (4, 2)])
def test_expert_parallel_layer_meets_the_cost_model(pools, world, ep_size):
    """(4, 2): a pool smaller than the world adds the job-wide threshold mean, still within 8."""
    per_rank = pools(world).run(all_routings, ep_size, 16)
    for rank, rows in enumerate(per_rank):
        for row in rows:
            assert meets_targets(row), f"rank {rank}: {row}"
    for i in range(len(ROUTINGS)):  # every rank issues the same collectives, whatever its tokens
        assert len({str(r[i]["collective_ops"]) + str(r[i]["collective_ops_backward"]) for r in per_rank}) == 1


def _overlap_order() -> list[str]:
    """Order of the payload exchange's launch / land and the shared experts' forward and backward."""
    from engine.config import load_config
    from models.moe.layer import MoELayer
    from parallel import dispatch
    from parallel.expert_parallel import attach_expert_parallel
    from parallel.groups import create_groups

    cfg = load_config(None, ["model.hidden_size=16", "model.num_heads=2", "model.moe.num_experts=4",
                             "model.moe.expert_hidden=32", "model.moe.routing=diffmoe", "model.moe.num_shared_experts=1",
                             "model.moe.pool=ep_group", "parallel.ep_size=2"])
    groups = create_groups(2)
    layer = MoELayer(cfg.model, 1, ep_rank=groups.ep_rank, ep_size=2)
    attach_expert_parallel(layer, cfg, groups)
    events: list[str] = []
    launch, land = dispatch._PackedExchange.launch, dispatch._PackedExchange.land

    def record_launch(self, tensors, forward):
        events.append(f"launch {'fwd' if forward else 'bwd'} {len(self.kind_of)}")
        return launch(self, tensors, forward)

    def record_land(self, forward):
        events.append(f"land {'fwd' if forward else 'bwd'} {len(self.kind_of)}")
        return land(self, forward)

    dispatch._PackedExchange.launch, dispatch._PackedExchange.land = record_launch, record_land
    layer.shared.register_forward_hook(lambda *_: events.append("shared fwd"))
    layer.shared.register_full_backward_hook(lambda *_: events.append("shared bwd"))
    try:
        x = torch.randn(2, 8, 16, requires_grad=True)
        layer(x, torch.randn(2, 16), torch.rand(2)).square().mean().backward()
    finally:
        dispatch._PackedExchange.launch, dispatch._PackedExchange.land = launch, land
    return events


@pytest.mark.slow
def test_shared_experts_run_while_the_payload_is_in_flight(pools):
    for events in pools(2).run(_overlap_order):
        # the payload exchange has 3 tensors (tokens, gates, expert bits), the combine 1
        assert events.index("launch fwd 3") < events.index("shared fwd") < events.index("land fwd 3"), events
        assert events.index("launch bwd 3") < events.index("shared bwd") < events.index("land bwd 3"), events
