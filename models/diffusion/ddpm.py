"""DDPM with epsilon prediction and learned-range variance (Ho et al.; Nichol & Dhariwal; DiT).

Step convention: the forward process has steps s = 1 .. T (T = `diffusion.num_timesteps`, 1000),
alpha_bar_s decreasing, x_T ~ noise. Arrays are indexed by n = s - 1 in 0 .. T-1 (T-1 most noisy).
The model receives t = 1 - s / T = 1 - (n + 1) / T in [0, 1): t -> 0 is noise, t -> 1 is data, as
for rectified flow (the DDPM configs' timestep embedding sees 999 - 1000 t = n, DiT's step index).

Loss with learned sigma: MSE(eps) + the variational bound in bits, where the VLB sees the predicted
mean with its gradient stopped so that it trains only the variance (improved DDPM / DiT). The
variance is exp(v' log beta_s + (1 - v') log beta~_s) with v' = (v + 1) / 2 from the extra output
channels. Without learned sigma: MSE only and the fixed small variance beta~_s for sampling.
Sampling is respaced to `steps` (e.g. 250) evenly spaced original steps: ancestral ("ddpm") or
deterministic DDIM with eta = 0 ("ddim").
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from tqdm.auto import tqdm

from models.diffusion.flow import ModelFn, mean_flat


class GaussianSchedule:
    """Derived quantities of a discrete Gaussian forward process with the given betas (float64)."""

    def __init__(self, betas: torch.Tensor):
        if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("a Gaussian schedule needs at least 2 betas in (0, 1]")
        self.betas = betas.to(torch.float64)
        self.num_steps = len(betas)
        alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        acp, acp_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        # square roots taken in float64: 1 - alpha_bar is ~1e-4 at the first step
        self.sqrt_alphas_cumprod = acp.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - acp).sqrt()
        self.sqrt_alphas_cumprod_prev = acp_prev.sqrt()
        self.sqrt_one_minus_alphas_cumprod_prev = (1.0 - acp_prev).sqrt()
        # q(x_{s-1} | x_s, x_0) = N(coef_x0 x_0 + coef_xt x_s, posterior_variance)
        self.posterior_variance = self.betas * (1.0 - acp_prev) / (1.0 - acp)
        # the first posterior variance is 0; its log is clipped to the next one (improved DDPM)
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef_x0 = self.betas * acp_prev.sqrt() / (1.0 - acp)
        self.posterior_mean_coef_xt = (1.0 - acp_prev) * alphas.sqrt() / (1.0 - acp)

    @staticmethod
    def linear(num_steps: int) -> "GaussianSchedule":
        """Linear betas 1e-4 .. 0.02 for 1000 steps (scaled by 1000 / num_steps otherwise)."""
        scale = 1000.0 / num_steps
        return GaussianSchedule(torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64))

    def respaced(self, kept: Sequence[int]) -> "GaussianSchedule":
        """The process that visits only the kept (increasing) steps, with the same alpha_bar there."""
        acp = self.alphas_cumprod[torch.as_tensor(list(kept))]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        return GaussianSchedule(1.0 - acp / prev)

    def take(self, name: str, n: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Entries n [B] of array `name`, shaped [B, 1, ...] to broadcast against `like`, float32."""
        values = getattr(self, name).to(n.device)[n].to(torch.float32)
        return values.reshape(-1, *([1] * (like.ndim - 1)))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log-probability of x in [-1, 1] quantised to 256 bins of width 2/255 under
    N(mean, e^(2 log_scale)); the edge bins extend to -inf / +inf."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (centered + 1.0 / 255.0))
    cdf_min = torch.special.ndtr(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def respaced_steps(num_steps: int, steps: int) -> list[int]:
    """`steps` evenly spaced original step indices in 0 .. num_steps-1, first and last included."""
    if not 2 <= steps <= num_steps:
        raise ValueError(f"DDPM sampling steps must be in 2..{num_steps} (diffusion.num_timesteps), got {steps}")
    stride = (num_steps - 1) / (steps - 1)
    return [round(i * stride) for i in range(steps)]


def _noise_like(x: torch.Tensor, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    if generators is None:
        return torch.randn_like(x)
    if len(generators) != x.shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {x.shape[0]}")
    rows = [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.stack(rows).to(device=x.device, dtype=x.dtype)


class DDPM:
    def __init__(self, num_timesteps: int = 1000, learn_sigma: bool = True, guided_channels: int | None = 3):
        """`guided_channels`: channels classifier-free guidance applies to; DiT's convention (and the
        references built on it) guides the first 3, None guides all."""
        self.num_timesteps = num_timesteps
        self.learn_sigma = learn_sigma
        self.guided_channels = guided_channels
        self.schedule = GaussianSchedule.linear(num_timesteps)

    # ---- the t <-> step convention ----------------------------------------------------------

    def time_of_step(self, n: torch.Tensor) -> torch.Tensor:
        """Model time t = 1 - (n + 1) / T of array index n (0 .. T-1)."""
        return 1.0 - (n.to(torch.float32) + 1.0) / self.num_timesteps

    def step_of_time(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of `time_of_step` (rounded to the nearest step)."""
        n = torch.round((1.0 - t.to(torch.float64)) * self.num_timesteps).long() - 1
        return n.clamp(0, self.num_timesteps - 1)

    def timesteps_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """Training t [B] for uniformly drawn steps: n = floor(u T)."""
        n = (u.to(torch.float64) * self.num_timesteps).long().clamp(0, self.num_timesteps - 1)
        return self.time_of_step(n).to(u.device)

    # ---- forward process, posterior, model distribution ------------------------------------

    def q_sample(self, x0: torch.Tensor, n: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_n = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise."""
        s = self.schedule
        return s.take("sqrt_alphas_cumprod", n, x0) * x0 + s.take("sqrt_one_minus_alphas_cumprod", n, x0) * noise

    @staticmethod
    def q_posterior(schedule: GaussianSchedule, x0: torch.Tensor, x_t: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log-variance of q(x_{n-1} | x_n, x0)."""
        mean = schedule.take("posterior_mean_coef_x0", n, x_t) * x0 + schedule.take("posterior_mean_coef_xt", n, x_t) * x_t
        return mean, schedule.take("posterior_log_variance_clipped", n, x_t).expand_as(x_t)

    @staticmethod
    def predict_x0(schedule: GaussianSchedule, x_t: torch.Tensor, n: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (x_t - schedule.take("sqrt_one_minus_alphas_cumprod", n, x_t) * eps) / schedule.take("sqrt_alphas_cumprod", n, x_t)

    def p_mean_log_variance(self, schedule: GaussianSchedule, out: torch.Tensor, x_t: torch.Tensor,
                            n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of p(x_{n-1} | x_n) from the model output [eps (; v)]."""
        eps, v = self.split_output(out, x_t.shape[1])
        min_log = schedule.take("posterior_log_variance_clipped", n, x_t)
        if v is None:
            log_var = min_log.expand_as(x_t)
        else:
            max_log = torch.log(schedule.take("betas", n, x_t))
            frac = (v + 1.0) / 2.0
            log_var = frac * max_log + (1.0 - frac) * min_log
        mean, _ = self.q_posterior(schedule, self.predict_x0(schedule, x_t, n, eps), x_t, n)
        return mean, log_var

    def split_output(self, out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(eps, v) with v None without learned sigma; checks the model's channel count."""
        expected = 2 * channels if self.learn_sigma else channels
        if out.shape[1] != expected:
            raise ValueError(f"DDPM with model.learn_sigma={self.learn_sigma} needs {expected} output channels, "
                             f"the model gave {out.shape[1]}")
        return (out[:, :channels], out[:, channels:]) if self.learn_sigma else (out, None)

    # ---- training ---------------------------------------------------------------------------

    def vlb_bits(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """[B] variational-bound term in bits: KL(q posterior || p) for n > 0, decoder NLL at n = 0."""
        true_mean, true_log_var = self.q_posterior(self.schedule, x0, x_t, n)
        mean, log_var = self.p_mean_log_variance(self.schedule, out, x_t, n)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(n == 0, nll, kl)

    def training_losses(self, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """[B] per-sample loss: MSE(eps) (+ VLB with the mean's gradient stopped, learned sigma)."""
        n = self.step_of_time(t).to(x0.device)
        x0, noise = x0.float(), noise.float()
        x_t = self.q_sample(x0, n, noise)
        out = model_fn(x_t, t).float()
        eps, v = self.split_output(out, x0.shape[1])
        loss = mean_flat((noise - eps) ** 2)
        if v is not None:
            loss = loss + self.vlb_bits(torch.cat([eps.detach(), v], dim=1), x0, x_t, n)
        return loss

    # ---- sampling ---------------------------------------------------------------------------

    def sample(self, model_fn: ModelFn, z: torch.Tensor, steps: int, sampler: str = "ddpm",
               progress: bool = False, generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """Denoise z (pure noise) with `steps` respaced steps; ancestral `ddpm` draws its per-step
        noise from `generators` (one per sample, so a sample does not depend on its batch) or the
        global RNG; `ddim` is deterministic (eta = 0)."""
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"diffusion.sampler: DDPM samples with 'ddpm' or 'ddim', got {sampler!r}")
        kept = respaced_steps(self.num_timesteps, steps)
        schedule = self.schedule.respaced(kept)
        x = z.float()
        b = x.shape[0]
        for i in tqdm(range(len(kept) - 1, -1, -1), desc=f"{sampler} sampling", disable=not progress, leave=False):
            local = torch.full((b,), i, dtype=torch.long, device=x.device)
            t = self.time_of_step(torch.full((b,), kept[i], dtype=torch.long, device=x.device))
            out = model_fn(x, t).float()
            if sampler == "ddpm":
                mean, log_var = self.p_mean_log_variance(schedule, out, x, local)
                x = mean + (torch.exp(0.5 * log_var) * _noise_like(x, generators) if i > 0 else 0.0)
            else:
                eps, _ = self.split_output(out, x.shape[1])
                x0 = self.predict_x0(schedule, x, local, eps)
                x = (schedule.take("sqrt_alphas_cumprod_prev", local, x) * x0
                     + schedule.take("sqrt_one_minus_alphas_cumprod_prev", local, x) * eps)
        return x
