"""DiffMoE's compute-vs-noise curve: average activated parameters under dynamic inference,
per timestep bucket and per class (the end-of-training evaluation logs it, docs/tensorboard.md).

    profile = activated_params_profile(model, objective, num_classes=10, samples_per_class=8, ...)
    profile["by_t"]      # [TIME_BUCKETS] parameters applied per token at t in bucket (NaN: no step there)
    profile["by_class"]  # [num_classes] parameters applied per token over a class's whole sampling run
    profile["mean"]      # over every class and step

Every sampler step advances all samples of the batch to the same t, so the model-level meters
(`moe.reset_meters` before each forward, `moe.average_activated_params` after it) give one value
per step, which lands in that t's bucket. Collective under expert parallelism: every rank runs
the same samples.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.sampling import generate
from models import moe
from models.moe.layer import TIME_BUCKETS

if TYPE_CHECKING:
    from engine.text_conditioning import TextConditioner
    from models.diffusion import Objective

PROFILE_SEED_BASE = 2_000_000  # profile sample j of class c uses seed PROFILE_SEED_BASE + c * n + j


def supports_dynamic_inference(model: nn.Module) -> bool:
    """True when every MoE layer that selects by expert choice has a capacity predictor (DiffMoE)."""
    layers = [layer for layer in moe.moe_layers(model) if layer.routing != "token_choice"]
    return bool(layers) and all(layer.predictor is not None for layer in layers)


@torch.no_grad()
def activated_params_profile(model: nn.Module, objective: Objective, num_classes: int, samples_per_class: int,
                             cfg_scale: float, steps: int, sampler: str, threshold_shift: float,
                             text: TextConditioner | None = None) -> dict[str, torch.Tensor]:
    """Sample `samples_per_class` images of every class with dynamic inference and measure the
    parameters applied per token (see the module docstring). The model's inference mode is restored."""
    if not supports_dynamic_inference(model):
        raise ValueError("activated_params_profile needs DiffMoE layers with the capacity predictor "
                         "(model.moe.routing=diffmoe, model.moe.predictor=true)")
    layers = list(moe.moe_layers(model))
    saved = [(layer.inference, layer.threshold_shift) for layer in layers]
    by_t_sum = torch.zeros(TIME_BUCKETS, dtype=torch.float64)
    by_t_count = torch.zeros(TIME_BUCKETS, dtype=torch.float64)
    step_values: list[float] = []

    def reset(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        moe.reset_meters(module)

    def record(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: torch.Tensor) -> None:
        t = args[1] if len(args) > 1 else kwargs["t"]
        value = moe.average_activated_params(module)
        bucket = min(int(float(t.float().mean()) * TIME_BUCKETS), TIME_BUCKETS - 1)
        by_t_sum[bucket] += value
        by_t_count[bucket] += 1
        step_values.append(value)

    hooks = [model.register_forward_pre_hook(reset, with_kwargs=True),
             model.register_forward_hook(record, with_kwargs=True)]
    by_class = torch.zeros(num_classes, dtype=torch.float64)
    try:
        moe.set_inference(model, "dynamic", threshold_shift)
        for c in range(num_classes):
            labels = torch.full((samples_per_class,), c, dtype=torch.long)
            seeds = PROFILE_SEED_BASE + c * samples_per_class + torch.arange(samples_per_class)
            condition = text.label_kwargs(labels) if text is not None else {}
            step_values.clear()
            generate(model, objective, labels, seeds, cfg_scale, steps, sampler, **condition)
            # every step sees the same number of tokens: the mean over steps is the mean over tokens
            by_class[c] = sum(step_values) / len(step_values)
    finally:
        for hook in hooks:
            hook.remove()
        for layer, (mode, shift) in zip(layers, saved):
            layer.inference, layer.threshold_shift = mode, shift
        moe.reset_meters(model)
    by_t = torch.where(by_t_count > 0, by_t_sum / by_t_count.clamp_min(1), torch.full_like(by_t_sum, float("nan")))
    return {"by_t": by_t, "by_class": by_class, "mean": by_class.mean()}
