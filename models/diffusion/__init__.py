"""Diffusion objectives behind one interface (see docs/models.md):

    objective.learn_sigma                                   # the model outputs 2C channels when True
    objective.guided_channels                               # channels CFG guides (None: all)
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
    guided_channels: int | None

    def timesteps_from_uniform(self, u: torch.Tensor) -> torch.Tensor: ...

    def training_losses(self, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...

    def sample(self, model_fn: ModelFn, z: torch.Tensor, steps: int, sampler: str, progress: bool = False,
               generators: list[torch.Generator] | None = None) -> torch.Tensor: ...


def build_diffusion(cfg: Config) -> Objective:
    """The objective of `cfg.diffusion`, matching the model's `cfg.model.learn_sigma`."""
    d = cfg.diffusion
    # auto keeps each objective's own default (DDPM: DiT's first 3 channels; flow: all)
    guidance = {} if d.cfg_channels == "auto" else {"guided_channels": 3 if d.cfg_channels == "first3" else None}
    if d.objective == "flow":
        if cfg.model.learn_sigma:
            raise ValueError("model.learn_sigma: rectified flow predicts a velocity only; set it to false")
        return RectifiedFlow(d.timestep_sampling, **guidance)
    if d.objective == "ddpm":
        if d.timestep_sampling != "uniform":
            raise ValueError("diffusion.timestep_sampling: DDPM trains on uniformly drawn steps; use 'uniform'")
        return DDPM(d.num_timesteps, learn_sigma=cfg.model.learn_sigma, **guidance)
    raise ValueError(f"diffusion.objective: unknown {d.objective!r} (known: 'flow', 'ddpm')")


def guided_model_fn(model: DiT, y: torch.Tensor | None, cfg_scale: float, text: TextEmbeddings | None = None,
                    null_text: TextEmbeddings | None = None, guided_channels: int | None = None) -> ModelFn:
    """model_fn(x, t) for sampling class `y`: plain conditional output at cfg_scale 1, otherwise
    classifier-free guidance v_u + s (v_c - v_u) on the first `guided_channels` channels (None: all;
    see DiT.forward_with_cfg for how the two halves are pooled). Text-conditioned models take the
    prompts' `text` instead, and `null_text` (the empty prompt) as the unconditional half."""
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, y, text=text)
    return lambda x, t: model.forward_with_cfg(x, t, y, cfg_scale, text=text, null_text=null_text,
                                               guided_channels=guided_channels)
