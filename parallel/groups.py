"""Expert-parallel process groups, registered with DeepSpeed.

World W, expert-parallel degree S (`parallel.ep_size`, divides W):

    EP groups           [0..S-1], [S..2S-1], ...       ranks that together hold all experts; the
                                                       all-to-all and the `ep_group` pool run here
    expert-DP groups    [i, i+S, i+2S, ...]             ranks holding the same experts (expert gradients
                                                       are reduced here only)
    dense DP group      all ranks                      dense gradients

EP groups are consecutive ranks, so with launchers that number the ranks of a node consecutively
(deepspeed, torchrun, srun) an EP group stays inside a node whenever S <= GPUs per node and the
all-to-all runs over NVLink, while only the expert-DP reduction crosses nodes.

The groups are DeepSpeed's own (`deepspeed.utils.groups`, name `ep_size_S`): its engine and ZeRO
look expert parameters (`allreduce=False`, `group_name='ep_size_S'`) up by that name and reduce their
gradients over the expert-DP group, dividing by the *world* size like the dense ones. With the
all-to-all's backward, the expert gradient on its owner already sums the contributions of every
rank of its EP group, so the result is exactly the gradient of the mean loss over the global batch
(derivation in docs/parallel.md).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertParallelGroups:
    rank: int  # global rank
    world_size: int
    ep_size: int  # ranks per EP group
    ep_rank: int  # position in the EP group: this rank holds experts [ep_rank*E/S, (ep_rank+1)*E/S)
    ep_group: dist.ProcessGroup
    ep_ranks: tuple[int, ...]  # global ranks of this rank's EP group, in EP-rank order
    expert_dp_size: int  # ranks holding the same experts (= world_size / ep_size)
    expert_dp_rank: int
    expert_dp_group: dist.ProcessGroup
    expert_dp_ranks: tuple[int, ...]
    group_name: str  # DeepSpeed's name of both groups: expert params carry it as `group_name`


def _deepspeed_comm_ready() -> None:
    """DeepSpeed's comm layer wraps the default group (the trainer's init does this already)."""
    import deepspeed.comm as ds_comm

    if not ds_comm.is_initialized():
        ds_comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)


_warned_cross_node: set[str] = set()


def create_groups(ep_size: int) -> ExpertParallelGroups:
    """Create (once) and return this rank's EP and expert-DP groups; collective over all ranks."""
    if not dist.is_initialized():
        raise RuntimeError("create_groups needs torch.distributed initialised first (parallel.zero.init_distributed)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"parallel.ep_size: {ep_size} does not divide the world size {world}")
    _deepspeed_comm_ready()
    from deepspeed.utils import groups as ds_groups

    name = f"ep_size_{ep_size}"
    ds_groups._create_expert_and_data_parallel(ep_size)  # no-op when DeepSpeed already has `name`
    ep_ranks = tuple(ds_groups._get_expert_parallel_group_ranks(name))
    edp_ranks = tuple(ds_groups._get_expert_data_parallel_group_ranks(name))
    first = rank - rank % ep_size
    if ep_ranks != tuple(range(first, first + ep_size)) or edp_ranks != tuple(range(rank % ep_size, world, ep_size)):
        raise RuntimeError(f"DeepSpeed built expert groups {ep_ranks} / {edp_ranks} for rank {rank}; expected "
                           "consecutive EP groups (is `use_data_before_expert_parallel_` set in the DeepSpeed config?)")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    if rank == 0 and ep_size > local_world and name not in _warned_cross_node:
        _warned_cross_node.add(name)  # checkpoint save/load call this again: say it once
        log.warning("parallel.ep_size=%d exceeds the %d ranks of a node: the expert all-to-all crosses nodes",
                    ep_size, local_world)
    return ExpertParallelGroups(
        rank=rank, world_size=world, ep_size=ep_size, ep_rank=rank % ep_size,
        ep_group=ds_groups._get_expert_parallel_group(name), ep_ranks=ep_ranks,
        expert_dp_size=world // ep_size, expert_dp_rank=rank // ep_size,
        expert_dp_group=ds_groups._get_expert_data_parallel_group(name), expert_dp_ranks=edp_ranks,
        group_name=name)
