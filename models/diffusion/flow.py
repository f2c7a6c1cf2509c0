"""Rectified flow: z_t = t x + (1 - t) eps, the model predicts the velocity x - eps.

t = 0 is pure noise and t = 1 is data (the timestep embedder sees the same t). Sampling integrates
dz/dt = v(z, t) from t = 0 to t = 1 with Euler or Heun steps on a uniform grid.
"""
from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
from tqdm.auto import tqdm

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension except the batch."""
    return x.mean(dim=tuple(range(1, x.ndim)))


class RectifiedFlow:
    learn_sigma = False

    def __init__(self, timestep_sampling: Literal["uniform", "logit_normal"] = "uniform",
                 guided_channels: int | None = None):
        """`guided_channels`: channels classifier-free guidance applies to (None: all, as the DiffMoE
        flow sampler)."""
        if timestep_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"diffusion.timestep_sampling: unknown {timestep_sampling!r}")
        self.timestep_sampling = timestep_sampling
        self.guided_channels = guided_channels

    def timesteps_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """Training t [B] from per-sample uniforms u [B] in [0, 1): t = u, or sigmoid(Phi^-1(u))
        for the logit-normal (0, 1) density."""
        if self.timestep_sampling == "uniform":
            return u
        return torch.sigmoid(torch.special.ndtri(u))

    @staticmethod
    def interpolate(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_t = t x0 + (1 - t) noise."""
        t = t.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return t * x0 + (1 - t) * noise

    def training_losses(self, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """[B] mean squared error between the predicted and the true velocity x0 - noise."""
        v = model_fn(self.interpolate(x0, t, noise), t)
        return mean_flat((v.float() - (x0 - noise).float()) ** 2)

    def sample(self, model_fn: ModelFn, z: torch.Tensor, steps: int, sampler: str = "euler",
               progress: bool = False, generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """Integrate from noise z (t = 0) to data (t = 1) in `steps` uniform steps.

        `euler` uses one model call per step, `heun` two (trapezoidal corrector). The ODE is
        deterministic, so `generators` (per-sample noise for stochastic samplers) is not used.
        """
        if sampler not in ("euler", "heun"):
            raise ValueError(f"diffusion.sampler: rectified flow samples with 'euler' or 'heun', got {sampler!r}")
        if steps < 1:
            raise ValueError(f"sampling steps must be positive, got {steps}")
        x = z
        grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).tolist()
        for i in tqdm(range(steps), desc=f"{sampler} sampling", disable=not progress, leave=False):
            t0, t1 = grid[i], grid[i + 1]
            dt = t1 - t0
            v0 = model_fn(x, torch.full((x.shape[0],), t0, device=x.device))
            if sampler == "euler":
                x = x + dt * v0
            else:
                x_pred = x + dt * v0
                v1 = model_fn(x_pred, torch.full((x.shape[0],), t1, device=x.device))
                x = x + dt * 0.5 * (v0 + v1)
        return x
