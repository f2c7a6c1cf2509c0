"""Rectified flow and DDPM against hand-computed values; samplers on ODEs with known solutions."""
from __future__ import annotations

import math

import pytest
import torch

from engine.config import ConfigError, load_config
from models import build_model
from models.diffusion import DDPM, RectifiedFlow, build_diffusion, guided_model_fn
from models.diffusion.ddpm import GaussianSchedule, respaced_steps

torch.set_num_threads(1)

DDPM_SIGMA = ["diffusion.objective=ddpm", "diffusion.sampler=ddpm", "model.learn_sigma=true"]


# ---- rectified flow -------------------------------------------------------------------------


def test_flow_loss_hand_computed() -> None:
    x0 = torch.tensor([1.0, -1.0]).reshape(1, 1, 1, 2)
    noise = torch.tensor([0.5, 2.0]).reshape(1, 1, 1, 2)
    t = torch.tensor([0.25])
    # z = 0.25 x0 + 0.75 noise = [0.625, 1.25]; target x0 - noise = [0.5, -3]; the model returns z
    loss = RectifiedFlow().training_losses(lambda z, tt: z, x0, t, noise)
    assert loss.shape == (1,)
    assert float(loss) == pytest.approx((0.125**2 + 4.25**2) / 2)


def test_flow_loss_is_per_sample_mean() -> None:
    x0 = torch.zeros(2, 1, 2, 2)
    noise = torch.ones(2, 1, 2, 2)
    # target -1 everywhere; prediction 0 for sample 0 and 1 for sample 1
    loss = RectifiedFlow().training_losses(lambda z, t: torch.arange(2.0).reshape(2, 1, 1, 1).expand(2, 1, 2, 2),
                                           x0, torch.tensor([0.3, 0.7]), noise)
    assert torch.allclose(loss, torch.tensor([1.0, 4.0]))


def test_flow_timestep_sampling() -> None:
    u = torch.tensor([0.1, 0.5, 0.8413447460685429])  # Phi(1) in the last entry
    assert torch.equal(RectifiedFlow("uniform").timesteps_from_uniform(u), u)
    t = RectifiedFlow("logit_normal").timesteps_from_uniform(u)
    assert t[1] == pytest.approx(0.5)
    assert t[2] == pytest.approx(1 / (1 + math.exp(-1.0)), abs=1e-6)
    assert t[0] == pytest.approx(1 / (1 + math.exp(1.2815515655446004)), abs=1e-6)  # Phi^-1(0.1)


def test_euler_is_exact_for_constant_velocity() -> None:
    z = torch.randn(2, 1, 2, 2)
    velocity = torch.randn(2, 1, 2, 2)
    out = RectifiedFlow().sample(lambda x, t: velocity, z, steps=3, sampler="euler")
    assert torch.allclose(out, z + velocity, atol=1e-6)


def test_heun_is_exact_for_velocity_linear_in_t_and_euler_is_not() -> None:
    a, b = 0.7, -1.3
    z = torch.randn(2, 1, 2, 2)

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (2,)
        return (a + b * t).reshape(2, 1, 1, 1).expand_as(x)

    exact = z + a + b / 2  # integral of a + b t over [0, 1]
    assert torch.allclose(RectifiedFlow().sample(v, z, steps=3, sampler="heun"), exact, atol=1e-6)
    # Euler sums v at t = 0, 1/3, 2/3: a + b / 3
    assert torch.allclose(RectifiedFlow().sample(v, z, steps=3, sampler="euler"), z + a + b / 3, atol=1e-6)


def test_heun_integrates_linear_ode_to_second_order() -> None:
    # dx/dt = x: exact e^1; Heun's one-step factor is 1 + h + h^2 / 2
    z = torch.ones(1, 1, 1, 1)
    out = RectifiedFlow().sample(lambda x, t: x, z, steps=4, sampler="heun")
    assert float(out) == pytest.approx((1 + 0.25 + 0.25**2 / 2) ** 4)


# ---- DDPM -----------------------------------------------------------------------------------

BETA1 = 1e-4 + (0.02 - 1e-4) / 999  # second linear beta


def test_linear_schedule_hand_values() -> None:
    s = GaussianSchedule.linear(1000)
    assert float(s.betas[0]) == pytest.approx(1e-4)
    assert float(s.betas[-1]) == pytest.approx(0.02)
    assert float(s.alphas_cumprod[1]) == pytest.approx((1 - 1e-4) * (1 - BETA1), rel=1e-12)


def test_time_step_convention() -> None:
    ddpm = DDPM(1000, learn_sigma=False)
    t = ddpm.timesteps_from_uniform(torch.tensor([0.0, 0.9995, 0.5004, 0.99999999]))
    assert torch.allclose(t, torch.tensor([0.999, 0.0, 0.499, 0.0]))
    n = torch.arange(1000)
    assert torch.equal(ddpm.step_of_time(ddpm.time_of_step(n)), n)


def test_q_sample_hand_computed() -> None:
    ddpm = DDPM(1000, learn_sigma=False)
    x0 = torch.tensor([[0.5]])
    noise = torch.tensor([[2.0]])
    out = ddpm.q_sample(x0, torch.tensor([1]), noise)
    acp = (1 - 1e-4) * (1 - BETA1)
    assert float(out) == pytest.approx(math.sqrt(acp) * 0.5 + math.sqrt(1 - acp) * 2.0, rel=1e-6)


def test_posterior_equals_bayes_rule() -> None:
    # q(x_{s-1} | x_s, x0) from the product of N(x_{s-1}; sqrt(acp_prev) x0, 1 - acp_prev)
    # and N(x_s; sqrt(alpha) x_{s-1}, beta), completed into one Gaussian
    ddpm = DDPM(1000, learn_sigma=False)
    s = ddpm.schedule
    for n in (1, 500, 999):
        beta = float(s.betas[n])
        alpha = 1 - beta
        acp_prev = float(s.alphas_cumprod[n - 1])
        precision = 1 / (1 - acp_prev) + alpha / beta
        x0, xt = 0.3, -0.8
        mean_expect = (math.sqrt(acp_prev) * x0 / (1 - acp_prev) + math.sqrt(alpha) * xt / beta) / precision
        mean, log_var = ddpm.q_posterior(s, torch.tensor([[x0]]), torch.tensor([[xt]]), torch.tensor([n]))
        assert float(mean) == pytest.approx(mean_expect, rel=1e-5)
        assert float(log_var) == pytest.approx(math.log(1 / precision), rel=1e-5)


def test_mse_loss_without_learned_sigma() -> None:
    ddpm = DDPM(1000, learn_sigma=False)
    noise = torch.tensor([1.0, -2.0, 3.0, 0.0]).reshape(1, 1, 2, 2)
    loss = ddpm.training_losses(lambda x, t: torch.zeros_like(x), torch.zeros_like(noise), torch.tensor([0.5]), noise)
    assert float(loss) == pytest.approx((1 + 4 + 9) / 4)


def oracle(ddpm: DDPM, x0: torch.Tensor, v: float | None = None):
    """model_fn returning the true eps of x_t for data x0 (and a constant variance output v)."""
    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = ddpm.step_of_time(t)
        s = ddpm.schedule
        eps = (x - s.take("sqrt_alphas_cumprod", n, x) * x0) / s.take("sqrt_one_minus_alphas_cumprod", n, x)
        return eps if v is None else torch.cat([eps, torch.full_like(eps, v)], dim=1)
    return model_fn


def test_vlb_kl_term_hand_computed() -> None:
    # exact eps -> the model mean equals the posterior mean; with v = 0 the log variance is the
    # average of log beta and log beta~, so the KL is 0.5 (-1 + dl + e^-dl), dl = (log beta - log beta~) / 2
    ddpm = DDPM(1000, learn_sigma=True)
    s = ddpm.schedule
    n = 400
    x0 = torch.tensor([0.2, -0.4]).reshape(1, 2, 1, 1)
    t = ddpm.time_of_step(torch.tensor([n]))
    loss = ddpm.training_losses(oracle(ddpm, x0, v=0.0), x0, t, torch.tensor([0.7, 1.1]).reshape(1, 2, 1, 1))
    beta = float(s.betas[n])
    beta_tilde = beta * (1 - float(s.alphas_cumprod[n - 1])) / (1 - float(s.alphas_cumprod[n]))
    dl = (math.log(beta) - math.log(beta_tilde)) / 2
    assert float(loss) == pytest.approx(0.5 * (-1 + dl + math.exp(-dl)) / math.log(2), rel=1e-3)


def test_vlb_decoder_nll_hand_computed() -> None:
    ddpm = DDPM(1000, learn_sigma=True)
    s = ddpm.schedule
    x0 = torch.tensor([0.3, 1.0]).reshape(1, 2, 1, 1)  # an interior value and the top bin
    loss = ddpm.training_losses(oracle(ddpm, x0, v=0.0), x0, ddpm.time_of_step(torch.tensor([0])),
                                torch.tensor([0.5, -0.5]).reshape(1, 2, 1, 1))
    # at step 0 the model mean is x0 itself; sigma^2 = sqrt(beta_0 * beta~_1) (clipped log variance)
    beta0 = float(s.betas[0])
    beta_tilde1 = BETA1 * (1 - (1 - 1e-4)) / (1 - (1 - 1e-4) * (1 - BETA1))
    sigma = math.sqrt(math.sqrt(beta0 * beta_tilde1))
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    w = 1 / 255 / sigma
    nll_interior = -math.log(phi(w) - phi(-w))
    nll_top = -math.log(1 - phi(-w))
    assert float(loss) == pytest.approx((nll_interior + nll_top) / 2 / math.log(2), rel=1e-4)


def test_vlb_does_not_train_the_mean() -> None:
    ddpm = DDPM(1000, learn_sigma=True)
    x0 = torch.randn(2, 1, 2, 2)
    noise = torch.randn(2, 1, 2, 2)
    out = torch.randn(2, 2, 2, 2, requires_grad=True)
    t = ddpm.time_of_step(torch.tensor([10, 600]))
    ddpm.training_losses(lambda x, tt: out, x0, t, noise).sum().backward()
    # the eps channels get only the MSE gradient; the variance channels get the VLB gradient
    assert torch.allclose(out.grad[:, :1], -2 * (noise - out[:, :1].detach()) / 4, atol=1e-6)
    assert out.grad[:, 1:].abs().sum() > 0


def test_respaced_steps_and_schedule() -> None:
    kept = respaced_steps(1000, 250)
    assert kept[0] == 0 and kept[-1] == 999 and len(set(kept)) == 250
    s = GaussianSchedule.linear(1000)
    r = s.respaced(kept)
    assert torch.allclose(r.alphas_cumprod, s.alphas_cumprod[kept], rtol=1e-12)
    with pytest.raises(ValueError, match="diffusion.num_timesteps"):
        respaced_steps(1000, 1)


@pytest.mark.parametrize("sampler,learn_sigma", [("ddim", False), ("ddim", True), ("ddpm", False), ("ddpm", True)])
def test_sampler_with_oracle_eps_recovers_data(sampler: str, learn_sigma: bool) -> None:
    # DDIM (eta 0) with the true eps is exact at every step; ancestral sampling ends with the
    # noise-free step whose mean is pred_x0 itself
    ddpm = DDPM(1000, learn_sigma=learn_sigma)
    x0 = torch.randn(3, 2, 4, 4)
    z = torch.randn(3, 2, 4, 4)
    out = ddpm.sample(oracle(ddpm, x0, v=0.3 if learn_sigma else None), z, steps=10, sampler=sampler)
    assert torch.allclose(out, x0, atol=1e-4)


def test_ancestral_noise_per_sample_generators() -> None:
    ddpm = DDPM(1000, learn_sigma=False)
    z = torch.randn(2, 1, 2, 2)

    def gens(seeds: list[int]) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in seeds]

    model_fn = lambda x, t: 0.1 * x  # noqa: E731 - elementwise, so samples do not interact
    both = ddpm.sample(model_fn, z, 5, "ddpm", generators=gens([7, 8]))
    second = ddpm.sample(model_fn, z[1:], 5, "ddpm", generators=gens([8]))
    assert torch.allclose(both[1:], second)
    assert not torch.allclose(ddpm.sample(model_fn, z, 5, "ddpm", generators=gens([9, 8]))[0], both[0])


# ---- factory, config checks, guidance -------------------------------------------------------


def test_build_diffusion_and_config_checks() -> None:
    assert isinstance(build_diffusion(load_config(None, ["diffusion.timestep_sampling=logit_normal"])), RectifiedFlow)
    ddpm = build_diffusion(load_config(None, DDPM_SIGMA + ["diffusion.num_timesteps=500"]))
    assert isinstance(ddpm, DDPM) and ddpm.learn_sigma and ddpm.num_timesteps == 500
    with pytest.raises(ConfigError, match="model.learn_sigma"):
        load_config(None, ["model.learn_sigma=true"])
    with pytest.raises(ConfigError, match="diffusion.timestep_sampling"):
        load_config(None, DDPM_SIGMA + ["diffusion.timestep_sampling=logit_normal"])
    with pytest.raises(ConfigError, match="eval.sample_steps"):
        load_config(None, DDPM_SIGMA + ["eval.sample_steps=1"])


def test_ddpm_rejects_wrong_output_channels() -> None:
    ddpm = DDPM(1000, learn_sigma=True)
    x = torch.zeros(1, 2, 2, 2)
    with pytest.raises(ValueError, match="model.learn_sigma=True needs 4 output channels"):
        ddpm.training_losses(lambda z, t: z, x, torch.tensor([0.5]), x)


def test_guided_model_fn_arithmetic() -> None:
    torch.manual_seed(0)
    cfg = load_config(None, ["model.depth=1", "model.hidden_size=16", "model.num_heads=2", "model.input_size=4",
                             "model.in_channels=1", "model.num_classes=3"])
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    x, t, y = torch.randn(2, 1, 4, 4), torch.tensor([0.2, 0.9]), torch.tensor([0, 2])
    assert torch.equal(guided_model_fn(model, y, 1.0)(x, t), model(x, t, y))
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 3))
    assert torch.allclose(guided_model_fn(model, y, 2.5)(x, t), uncond + 2.5 * (cond - uncond), atol=1e-5)
    # guided flow sampling runs end to end
    out = build_diffusion(cfg).sample(guided_model_fn(model, y, 2.5), torch.randn(2, 1, 4, 4), 2, "heun")
    assert out.shape == (2, 1, 4, 4) and torch.isfinite(out).all()
