"""Turn a model built for EP rank r of S into its expert-parallel self, the DeepSpeed way.

    groups = create_groups(cfg.parallel.ep_size)
    model  = build_model(cfg, groups.ep_rank, groups.ep_size)
    attach_expert_parallel(model, cfg, groups)           # pools, dispatchers, expert param marks
    engine = initialize_engine(model, optimizer_param_groups(model, cfg), cfg, ...)
    ...
    monitor.log(comm_stats(model))                       # comm/* bytes since the last call

DeepSpeed recognises expert parameters by `param.allreduce = False` and `param.group_name`, but
only builds expert-aware gradient reduction (ZeRO-1/2 partitions of expert groups, reduction over
the expert-data-parallel group) when its engine finds one of its own `deepspeed.moe.layer.MoE`
modules in the model. Our MoE layers are not; `attach_expert_parallel` therefore adds one
parameter-free `DeepSpeedExpertMarker` child that tells the engine the model has experts of group
`ep_size_S`. It holds no state (the state dict is unchanged) and never runs.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from models.moe import moe_layers
from parallel.dispatch import AllToAllDispatcher
from parallel.token_pool import build_pool

if TYPE_CHECKING:
    from engine.config import Config
    from parallel.groups import ExpertParallelGroups

log = logging.getLogger(__name__)
MARKER_NAME = "deepspeed_expert_marker"
COMM_KEYS = ("alltoall_bytes", "alltoall_extra_bytes", "metadata_bytes", "score_gather_bytes")


class DeepSpeedExpertMarker(DeepSpeedMoE):
    """Makes DeepSpeed's engine treat the model as MoE (expert groups in ZeRO, expert gradient
    reduction, expert broadcast at start-up). Skips `MoE.__init__`, which would build DeepSpeed's
    own gate and experts; carries only the attributes the engine reads."""

    def __init__(self, num_experts: int, ep_size: int, group_name: str):
        nn.Module.__init__(self)
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local_experts = num_experts // ep_size
        self.expert_group_name = group_name
        self.enable_expert_tensor_parallelism = False

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """The groups exist already (`parallel.groups.create_groups`)."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("DeepSpeedExpertMarker only marks the model for DeepSpeed; it is never called")


def attach_expert_parallel(model: nn.Module, cfg: Config, groups: ExpertParallelGroups) -> None:
    """Install the pool of `model.moe.pool` and (ep_size > 1) the all-to-all dispatcher in every MoE
    layer, and mark the expert parameters for DeepSpeed."""
    layers = list(moe_layers(model))
    if layers and cfg.model.moe.pool == "world" and groups.ep_size < groups.world_size and groups.rank == 0:
        log.warning("model.moe.pool=world with parallel.ep_size=%d < world %d: an expert's replica in one EP group may "
                    "receive up to all k of its tokens, %dx its average rows (docs/parallel.md); pool=ep_group avoids it",
                    groups.ep_size, groups.world_size, groups.world_size // groups.ep_size)
    for layer in layers:
        layer.pool = build_pool(cfg.model.moe.pool, groups, cfg.parallel.pool_selection)
        if groups.ep_size > 1:
            layer.dispatcher = AllToAllDispatcher(groups.ep_group, groups.ep_rank, groups.ep_size, layer.num_experts)
    if not layers:
        return
    for p in model.parameters():
        if getattr(p, "_is_expert", False):
            p.allreduce = False
            p.group_name = groups.group_name
    model.add_module(MARKER_NAME, DeepSpeedExpertMarker(layers[0].num_experts, groups.ep_size, groups.group_name))


def optimizer_param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """Trainable parameters as DeepSpeed wants them: one dense group, then the expert groups
    (`moe: True`, `name` = the expert group name) that ZeRO partitions over the expert-DP group."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return split_params_into_different_moe_groups_for_optimizer([{"name": "dense-params", "params": trainable}])


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over all ranks in place (e.g. the router-bias expert loads); returns `t`."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def comm_stats(model: nn.Module) -> dict[str, float]:
    """This rank's expert-parallel bytes sent since the last call, summed over MoE layers:
    `comm/alltoall_bytes` (hidden states, dispatch + combine, forward + backward),
    `comm/alltoall_extra_bytes` (side inputs such as conditioning), `comm/metadata_bytes`
    (routing metadata: counts, expert bits, gates, radix histograms, tie counts, threshold means),
    `comm/score_gather_bytes` (scores all-gathered by `pool_selection: gather`)."""
    totals = dict.fromkeys(COMM_KEYS, 0.0)
    for layer in moe_layers(model):
        for part in (layer.pool, layer.dispatcher):
            counter = getattr(part, "counter", None)
            if counter is not None:
                for key, value in counter.drain().items():
                    totals[key] += value
    return {f"comm/{key}": value for key, value in totals.items()}
