"""Diffusion objectives behind one interface (see docs/models.md):

    objective.learn_sigma                                   # the model outputs 2C channels when True
    objective.timesteps_from_uniform(u [B]) -> t [B]        # t in [0, 1]: 0 noise, 1 data
    objective.training_losses(model_fn, x0, t, noise) -> [B]
    objective.sample(model_fn, z, steps, sampler, progress=False, generators=None) -> x0

`model_fn(x, t)` returns the model output; for sampling with guidance build it with `guided_model_fn`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from models.diffusion.ddpm import DDPM
from models.diffusion.flow import ModelFn, RectifiedFlow

if TYPE_CHECKING:
    from engine.config import Config
    from models.dit import DiT
    from models.text import TextEmbeddings

__all__ = ["DDPM", "ModelFn", "Objective", "RectifiedFlow", "build_diffusion", "guided_model_fn"]


class Objective(Protocol):
    learn_sigma: bool

    def timesteps_from_uniform(self, u: torch.Tensor) -> torch.Tensor: ...

    def training_losses(self, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...

    def sample(self, model_fn: ModelFn, z: torch.Tensor, steps: int, sampler: str, progress: bool = False,
               generators: list[torch.Generator] | None = None) -> torch.Tensor: ...


def build_diffusion(cfg: Config) -> Objective:
    """The objective of `cfg.diffusion`, matching the model's `cfg.model.learn_sigma`."""
    d = cfg.diffusion
    if d.objective == "flow":
        if cfg.model.learn_sigma:
            raise ValueError("model.learn_sigma: rectified flow predicts a velocity only; set it to false")
        return RectifiedFlow(d.timestep_sampling)
    if d.objective == "ddpm":
        if d.timestep_sampling != "uniform":
            raise ValueError("diffusion.timestep_sampling: DDPM trains on uniformly drawn steps; use 'uniform'")
        return DDPM(d.num_timesteps, learn_sigma=cfg.model.learn_sigma)
    raise ValueError(f"diffusion.objective: unknown {d.objective!r} (known: 'flow', 'ddpm')")


def guided_model_fn(model: DiT, y: torch.Tensor | None, cfg_scale: float, text: TextEmbeddings | None = None,
                    null_text: TextEmbeddings | None = None) -> ModelFn:
    """model_fn(x, t) for sampling class `y`: plain conditional output at cfg_scale 1, otherwise
    classifier-free guidance v_u + s (v_c - v_u) (one batched call over both halves).
    Text-conditioned models take the prompts' `text` instead, and `null_text` (the empty prompt) as
    the unconditional half."""
    if text is not None:
        if cfg_scale == 1.0:
            return lambda x, t: model(x, t, y, text=text)
        return lambda x, t: model.forward_with_cfg(x, t, y, cfg_scale, text=text, null_text=null_text)
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, y)
    return lambda x, t: model.forward_with_cfg(x, t, y, cfg_scale)
