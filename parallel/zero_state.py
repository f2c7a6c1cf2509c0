"""Whole-tensor view of a DeepSpeed ZeRO-1/2 optimizer: fp32 master weights and Adam moments per
model parameter, gathered from (and written back to) the ranks' partitions.

ZeRO-1/2 flattens each optimizer param group into one buffer and gives every rank of the group's
data-parallel group one contiguous partition of it: the fp32 master weights, and the optimizer
state of that partition (`base_optimizer.state[partition]`: `exp_avg`, `exp_avg_sq`, `step`).
Dense groups are partitioned over all ranks, expert groups over their expert-data-parallel group.
DeepSpeed records, for each model parameter, the piece of it this rank's partition holds
(`param._hp_mapping`: its offset in the flattened parameter and in the partition; None when the
partition holds none of it) and the group it is partitioned over (`param._dp_group`).

`deepspeed.utils.safe_get_full_optimizer_state` / `safe_set_full_optimizer_state` read the moments
through views that DeepSpeed links only inside the first optimizer step, so they cannot restore a
fresh engine (a resume happens before any step). Reading the partitions through the same offsets
works at any time and keeps one code path for master weights and moments. Each element lives in
exactly one partition, so the gathering sum adds zeros only and is exact.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from parallel.checkpoint_io import CheckpointError

# How a scalar optimizer state (Adam's `step`) is stored, so a fresh optimizer gets the same type.
ScalarState = dict[str, tuple[str, float]]  # key -> ("tensor" | "int" | "float", value)


class ZeroOptimizerState:
    def __init__(self, engine: Any):
        zero = engine.optimizer
        lp_groups = getattr(zero, "bit16_groups", None)
        partitions = getattr(zero, "single_partition_of_fp32_groups", None)
        if lp_groups is None or partitions is None:
            raise CheckpointError(f"checkpoints need a DeepSpeed ZeRO stage 1 or 2 optimizer (parallel.zero_stage), "
                                  f"the engine has {type(zero).__name__}")
        self.base: torch.optim.Optimizer = zero.optimizer
        self._partition = {id(p): partitions[i] for i, group in enumerate(lp_groups) for p in group}
        self._partitions = list(partitions)

    def manages(self, param: torch.Tensor) -> bool:
        """Whether the optimizer updates `param` (False for frozen parameters and buffers)."""
        return id(param) in self._partition

    def tensor_keys(self) -> list[str]:
        """Element-wise state keys (AdamW: exp_avg, exp_avg_sq); empty before the first optimizer step."""
        keys: set[str] | None = None
        for part in self._partitions:
            state = self.base.state.get(part, {})
            found = {k for k, v in state.items() if torch.is_tensor(v) and v.shape == part.shape}
            if keys is not None and found != keys:
                raise CheckpointError(f"optimizer partitions hold different state keys: {sorted(keys)} vs "
                                      f"{sorted(found)}")
            keys = found
        return sorted(keys or ())

    def scalar_state(self) -> ScalarState:
        """The optimizer's scalar state (`step`): equal on every partition of every rank (checked)."""
        tensor_keys = set(self.tensor_keys())
        local: list[ScalarState] = []
        for part in self._partitions:
            state = self.base.state.get(part, {})
            local.append({k: _scalar(v) for k, v in state.items() if k not in tensor_keys})
        everyone: list[list[ScalarState] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, local)
        values = [s for rank_states in everyone for s in rank_states]
        if any(s != values[0] for s in values):
            raise CheckpointError(f"optimizer scalar state differs between partitions: {values}")
        return values[0] if values else {}

    @torch.no_grad()
    def gather(self, param: torch.Tensor, key: str | None) -> torch.Tensor:
        """The whole fp32 master weight (`key` None) or state `key` of `param`, on the CPU.

        Collective over the parameter's data-parallel group: all its ranks call it, in the same order.
        """
        source = self._source(param, key)
        full = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
        mapping = param._hp_mapping
        if mapping is not None:
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            full.narrow(0, lp.start, lp.numel).copy_(source.narrow(0, hp.start, hp.numel))
        if dist.get_world_size(param._dp_group) > 1:
            dist.all_reduce(full, group=param._dp_group)
        return full.view(param.shape).cpu()

    @torch.no_grad()
    def set(self, param: torch.Tensor, key: str | None, value: torch.Tensor) -> None:
        """Write this rank's piece of the whole tensor `value` into the master weight or state `key`."""
        mapping = param._hp_mapping
        if mapping is None:
            return
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        target = self._source(param, key)
        target.narrow(0, hp.start, hp.numel).copy_(value.reshape(-1).narrow(0, lp.start, lp.numel))

    def prepare_state(self, tensor_keys: list[str], scalars: ScalarState) -> None:
        """Give a fresh optimizer (no step taken yet) zero-filled state of the saved kinds, so `set`
        has somewhere to write; torch's `load_state_dict` places each value as the optimizer expects
        (e.g. `step` on the device for fused AdamW). An optimizer that has state keeps its tensors."""
        if all(self.base.state.get(part) for part in self._partitions):
            missing = set(tensor_keys) - set(self.tensor_keys())
            if missing:
                raise CheckpointError(f"the optimizer has no state {sorted(missing)} that the checkpoint holds")
            for part in self._partitions:
                _set_scalars(self.base.state[part], scalars)
            return
        saved = self.base.state_dict()
        state: dict[int, dict[str, Any]] = {}
        for group, saved_group in zip(self.base.param_groups, saved["param_groups"]):
            for part, index in zip(group["params"], saved_group["params"]):
                state[index] = {k: torch.zeros_like(part) for k in tensor_keys}
                state[index].update({k: _make_scalar(kind, v) for k, (kind, v) in scalars.items()})
        self.base.load_state_dict({"state": state, "param_groups": saved["param_groups"]})

    def _source(self, param: torch.Tensor, key: str | None) -> torch.Tensor:
        part = self._partition[id(param)]
        if key is None:
            return part
        state = self.base.state.get(part)
        if not state or key not in state:
            raise CheckpointError(f"the optimizer has no state '{key}' (prepare_state first)")
        return state[key]


def _scalar(value: Any) -> tuple[str, float]:
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise CheckpointError(f"unexpected optimizer state tensor of shape {tuple(value.shape)}")
        return ("tensor", value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"unexpected optimizer state value {value!r}")
    return ("int" if isinstance(value, int) else "float", value)


def _make_scalar(kind: str, value: float) -> Any:
    if kind == "tensor":
        return torch.tensor(float(value), dtype=torch.float32)
    return int(value) if kind == "int" else float(value)


def _set_scalars(state: dict[str, Any], scalars: ScalarState) -> None:
    for key, (kind, value) in scalars.items():
        if torch.is_tensor(state.get(key)):
            state[key].fill_(value)
        else:
            state[key] = _make_scalar(kind, value)
