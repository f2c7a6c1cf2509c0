"""MoE layers of the DiT FFN slot and the model-level hooks the engine calls.

    from models import moe
    loss = loss + moe.collect_aux_loss(model)          # after forward
    logger.log(moe.collect_stats(model))              # moe/layer{i}/... tensors
    moe.update_router_biases(model, all_reduce_sum)    # after each optimiser step (sigmoid_bias)
    moe.set_step(model, step)                          # capacity schedule, before the step's forward
    moe.set_inference(model, "dynamic", threshold_shift=0.05); moe.reset_meters(model)
    ... sample ...; moe.average_activated_params(model)  # parameters applied per token, measured
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from models.moe.layer import MoELayer

__all__ = ["MoELayer", "moe_layers", "collect_aux_loss", "collect_stats", "set_step", "update_router_biases",
           "set_inference", "reset_meters", "average_activated_params"]


def moe_layers(model: nn.Module) -> Iterator[MoELayer]:
    """Every MoE layer of the model, in module order."""
    return (m for m in model.modules() if isinstance(m, MoELayer))


def collect_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the layers' weighted auxiliary losses of the last forward (0 when there are none)."""
    losses = [layer.aux_loss for layer in moe_layers(model)]
    if not losses:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return torch.stack([loss.float().to(losses[0].device) for loss in losses]).sum()


def collect_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """`moe/layer{block}/{name}` -> detached tensor: 0-d scalars, 1-d per expert or per timestep
    bucket, 2-d the expert x timestep-bucket load matrix (`load_by_t`)."""
    return {f"moe/layer{layer.block_index}/{k}": v for layer in moe_layers(model) for k, v in layer.stats.items()}


def set_step(model: nn.Module, step: int) -> None:
    """Set the training step of the capacity schedule (model.moe.capacity_schedule_stage1/2)."""
    for layer in moe_layers(model):
        layer.set_step(step)


def update_router_biases(model: nn.Module, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """After each optimiser step: nudge every sigmoid_bias router's balancing bias by the expert
    loads counted since the last call (summed over ranks by `all_reduce_sum` when given, so every
    rank applies the same update), then restart the counts."""
    for layer in moe_layers(model):
        if layer.router.kind == "sigmoid_bias":
            load = layer.router.load.clone()
            if all_reduce_sum is not None:
                load = all_reduce_sum(load)
            layer.router.update_bias(load, layer.bias_update_rate)


def set_inference(model: nn.Module, mode: str, threshold_shift: float | None = None,
                  capacity: float | None = None) -> None:
    """Choose DiffMoE's inference rule: `static` (training top-k over the sampling batch) or
    `dynamic` (capacity-predictor thresholds; `threshold_shift` > 0 spends less compute).
    `capacity` sets the expert-choice layers' static k = int(pool_tokens / E * capacity) (the
    static compute knob; the training schedule's next `set_step` resets it); None keeps it."""
    if mode not in ("static", "dynamic"):
        raise ValueError(f"model.moe.inference: {mode!r} is not 'static' or 'dynamic'")
    if capacity is not None and not capacity > 0:
        raise ValueError(f"model.moe.capacity: must be > 0, got {capacity}")
    for layer in moe_layers(model):
        if mode == "dynamic" and layer.routing != "token_choice" and layer.predictor is None:
            raise ValueError("model.moe.inference=dynamic needs the capacity predictor (model.moe.predictor=true)")
        layer.inference = mode
        if threshold_shift is not None:
            layer.threshold_shift = threshold_shift
        if capacity is not None and layer.routing != "token_choice":
            layer.capacity = capacity


def reset_meters(model: nn.Module) -> None:
    """Restart the per-layer counts behind `average_activated_params`."""
    for layer in moe_layers(model):
        layer.reset_meter()


def average_activated_params(model: nn.Module) -> float:
    """Parameters applied per token by the whole model, MoE layers at their measured routing rate
    since `reset_meters` (the predictor excluded; nominal rate for layers that saw no token)."""
    layers = list(moe_layers(model))
    in_moe = {id(p) for layer in layers for p in layer.parameters()}
    dense = sum(p.numel() for p in model.parameters() if id(p) not in in_moe)
    return float(dense + sum(layer.measured_activated_params() for layer in layers))
