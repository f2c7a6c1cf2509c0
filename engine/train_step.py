"""One optimizer step: per-sample draws, the loss of every micro-batch, backward, DeepSpeed step.

Every random quantity of a training sample is drawn from its global index in the step's batch
(`engine.rng`), so the global batch of step s -- its label dropout, timesteps and noise -- is the
same whatever the world size and accumulation layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from engine.rng import per_sample_normal, per_sample_uniform
from models import moe

if TYPE_CHECKING:
    from engine.config import Config
    from engine.text_conditioning import TextConditioner
    from engine.train_metrics import IntervalMeter
    from models.diffusion import Objective


@dataclass
class TrainingInputs:
    x0: torch.Tensor  # [B, C, H, W] clean data
    y: torch.Tensor  # [B] labels, dropped ones replaced by the null class
    t: torch.Tensor  # [B] in [0, 1]
    noise: torch.Tensor  # [B, C, H, W]


def draw_training_inputs(batch: dict[str, Any], cfg: Config, objective: Objective, null_class: int,
                         device: torch.device) -> TrainingInputs:
    """Label dropout, timesteps and noise for a micro-batch, each from its samples' global indices."""
    seed, step, index = cfg.train.seed, int(batch["step"]), batch["index"]
    x0 = batch["x"]
    dropped = per_sample_uniform(seed, step, index, "label_drop") < cfg.model.class_dropout_prob
    y = torch.where(dropped, torch.full_like(batch["y"], null_class), batch["y"])
    t = objective.timesteps_from_uniform(per_sample_uniform(seed, step, index, "time"))
    noise = per_sample_normal(seed, step, index, tuple(x0.shape[1:]), "noise")
    return TrainingInputs(*(v.to(device, non_blocking=True) for v in (x0.float(), y, t, noise)))


def train_step(engine: Any, objective: Objective, micro_batches: list[dict[str, Any]], cfg: Config,
               meter: IntervalMeter, text: TextConditioner | None = None) -> bool:
    """Forward/backward every micro-batch of one step, then the optimizer step.

    Returns whether the update was applied: DeepSpeed skips it (no parameter change) when the
    global gradient norm is not finite. The loss of a micro-batch is its mean per-sample diffusion
    loss plus the MoE auxiliary losses; DeepSpeed averages gradients over accumulation steps and
    ranks, so the update follows the mean loss over the global batch. Text-conditioned models get
    the batch's caption embeddings from `text` (caption dropout drawn per global sample index).
    """
    model = engine.module
    dtype = next(model.parameters()).dtype
    meter.begin_step()
    for batch in micro_batches:
        inputs = draw_training_inputs(batch, cfg, objective, model.null_class, engine.device)
        condition = {"text": text.training_text(batch)} if text is not None else {}

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return engine(x_t.to(dtype), t, inputs.y, **condition).float()

        per_sample = objective.training_losses(model_fn, inputs.x0, inputs.t, inputs.noise)
        diffusion_loss = per_sample.mean()
        aux_loss = moe.collect_aux_loss(model)
        engine.backward(diffusion_loss + aux_loss)
        engine.step()
        meter.add_micro_batch(per_sample.detach(), inputs.t, aux_loss.detach())
    applied = engine.was_step_applied()
    meter.end_step(applied, engine.get_global_grad_norm())
    return applied


def after_step(model: torch.nn.Module, step: int, applied: bool,
               all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """MoE post-step hooks: router-bias balancing after an applied update; the schedule's step."""
    if applied:
        moe.update_router_biases(model, all_reduce_sum)
    moe.set_step(model, step)
