"""Per-parameter view of a DeepSpeed ZeRO-1/2 optimizer: the piece of each model parameter's fp32
master weight and Adam moments that this rank's partition holds, read and written in place.

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
exactly one partition of its group, so the pieces of all ranks tile every parameter exactly once:
a checkpoint writes each rank's pieces, never a gathered whole.
"""
from __future__ import annotations

from typing import Any

import torch
from parallel.checkpoint.files import CheckpointError

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

    def local_scalars(self) -> list[ScalarState]:
        """The scalar state (`step`) of each of this rank's partitions; a save checks that every
        partition of every rank agrees (they step together)."""
        tensor_keys = set(self.tensor_keys())
        return [{k: _scalar(v) for k, v in self.base.state.get(part, {}).items() if k not in tensor_keys}
                for part in self._partitions]

    def fragment(self, param: torch.Tensor) -> tuple[int, int] | None:
        """(offset, length) in the flattened `param` of the piece this rank's partition holds; None
        when it holds none of it."""
        mapping = param._hp_mapping
        if mapping is None:
            return None
        return mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel

    def view(self, param: torch.Tensor, key: str | None) -> torch.Tensor:
        """This rank's piece of the fp32 master weight (`key` None) or state `key` of `param`: a 1-D
        view into the partition (written through on load), aligned with `fragment(param)`."""
        hp = param._hp_mapping.hp_fragment_address
        return self._source(param, key).narrow(0, hp.start, hp.numel)

    def prepare_state(self, tensor_keys: list[str], scalars: ScalarState) -> None:
        """Give a fresh optimizer (no step taken yet) zero-filled state of the saved kinds, so `view`
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
