"""Flow convention and samplers: exactness on a point mass, convergence on a Gaussian, schedules, cancel."""

from __future__ import annotations

import pytest
import torch

from hdm_core.flow import (
    denoised_from_velocity,
    interpolate,
    sample_t_logit_normal,
    shift_sigmas,
    velocity_from_denoised,
    velocity_target,
)
from hdm_core.sampling import SAMPLERS, SamplingCancelled, flow_sigmas, sample_euler

STD = 0.5  # data ~ N(0, STD²)


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact E[x0 | x_t] for x0 ~ N(0, STD²), x_t = t·ε + (1 − t)·x0."""
    t = sigma.reshape(-1, *[1] * (x.dim() - 1)).double()
    return ((1 - t) * STD**2 / ((1 - t) ** 2 * STD**2 + t**2) * x.double()).to(x.dtype)


def test_flow_convention_round_trip():
    x0, noise, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([0.3, 0.8])
    xt = interpolate(x0, noise, t)
    v = velocity_target(x0, noise)
    assert torch.allclose(denoised_from_velocity(xt, v, t), x0, atol=1e-6)
    assert torch.allclose(velocity_from_denoised(xt, x0, t), v, atol=1e-5)
    ts = sample_t_logit_normal(10_000, generator=torch.Generator().manual_seed(0))
    assert 0 < ts.min() and ts.max() < 1 and abs(ts.mean().item() - 0.5) < 0.01


def test_official_schedule_is_float32_repeated_subtraction():
    sig = flow_sigmas(3)
    t = torch.ones((), dtype=torch.float32)
    for k in range(3):
        assert sig[k] == t
        t = t - 1 / 3
    assert sig[-1] == 0 and len(sig) == 4
    assert torch.allclose(flow_sigmas(32)[:-1], 1 - torch.arange(32) / 32, atol=1e-6)


def test_shift_and_img2img_schedules():
    t = torch.tensor([1.0, 0.5, 0.0])
    assert torch.equal(shift_sigmas(t, 1.0), t)
    assert shift_sigmas(t, 3.0).tolist() == pytest.approx([1.0, 0.75, 0.0])
    partial = flow_sigmas(10, denoise=0.5)  # the last 10 steps of a 20-step schedule
    assert len(partial) == 11 and partial[0].item() == pytest.approx(0.5) and partial[-1] == 0
    with pytest.raises(ValueError, match="denoise"):
        flow_sigmas(4, denoise=1.5)
    with pytest.raises(ValueError, match="steps must be"):
        flow_sigmas(0)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_are_exact_for_a_point_mass(name):
    target = torch.randn(1, 4, 2, 2)
    out = SAMPLERS[name](lambda x, s: target.expand_as(x), torch.randn(1, 4, 2, 2), flow_sigmas(5))
    assert torch.allclose(out, target, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_converge_on_a_gaussian(name):
    z = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    exact = STD * z  # probability-flow map from N(0, 1) at t = 1 to N(0, STD²) at t = 0
    errors = [(SAMPLERS[name](gaussian_denoiser, z, flow_sigmas(n, shift=3.0)) - exact).abs().max().item()
              for n in (8, 16)]
    assert errors[1] < errors[0] * 0.7
    if name != "euler":  # second order beats Euler at the same number of steps
        euler = (sample_euler(gaussian_denoiser, z, flow_sigmas(16, shift=3.0)) - exact).abs().max().item()
        assert errors[1] < euler / 2


def test_callback_sees_every_step_and_can_cancel():
    seen = []
    sample_euler(lambda x, s: x * 0, torch.randn(1, 4, 2, 2), flow_sigmas(4), callback=seen.append)
    assert [d["i"] for d in seen] == [0, 1, 2, 3] and set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}

    def stop(step):
        if step["i"] == 1:
            raise SamplingCancelled

    with pytest.raises(SamplingCancelled):
        sample_euler(lambda x, s: x * 0, torch.randn(1, 4, 2, 2), flow_sigmas(4), callback=stop)
