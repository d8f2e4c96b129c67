"""Bits/dim through the probability-flow ODE against the exact density of the analytic Gaussian."""

import math

import pytest
import torch

from diffusionlab.diffusion.analytic import Gaussian
from diffusionlab.diffusion.likelihood import (
    bits_per_dim,
    dequantize,
    image_bits_per_dim,
    log_likelihood,
)

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


@pytest.fixture
def gaussian() -> Gaussian:
    """A correlated 4-d Gaussian with mean away from 0 and spread like [-1, 1] image data."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    cov = 0.05 * a @ a.T + 0.02 * torch.eye(4, dtype=torch.float64)
    return Gaussian(torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64), cov)


def _log_normal(z: torch.Tensor, std: float) -> torch.Tensor:
    d = z[0].numel()
    return -0.5 * z.flatten(1).pow(2).sum(1) / std**2 - 0.5 * d * math.log(2 * math.pi * std**2)


def test_exact_divergence_matches_closed_form(gaussian):
    x = gaussian.sample(4, torch.Generator().manual_seed(1))
    res = log_likelihood(
        gaussian.denoise, x, SIGMA_MIN, SIGMA_MAX, divergence="exact", rtol=1e-6, atol=1e-6
    )
    exact = gaussian.log_prob(x, SIGMA_MIN)
    # the estimator's only bias: the prior N(0, sigma_max^2 I) instead of the true marginal
    # N(mu, C + sigma_max^2 I) at sigma_max (O(|mu| sqrt(d) / sigma_max) nats); with it removed the
    # ODE + divergence integral must be exact up to the solver tolerance
    prior_bias = _log_normal(res.z, SIGMA_MAX) - gaussian.log_prob(res.z, SIGMA_MAX)
    torch.testing.assert_close(res.log_prob - prior_bias, exact, atol=1e-4, rtol=0)
    torch.testing.assert_close(res.log_prob, exact, atol=0.05, rtol=0)
    assert res.nfe > 10
    # the end point is the exact ODE solution at sigma_max
    torch.testing.assert_close(
        res.z, gaussian.ode_solution(x, SIGMA_MIN, SIGMA_MAX), atol=1e-3, rtol=1e-4
    )


def test_hutchinson_is_unbiased_within_its_error(gaussian):
    x = gaussian.sample(2, torch.Generator().manual_seed(2))
    reps = 32
    xr = x.repeat_interleave(reps, 0)
    res = log_likelihood(
        gaussian.denoise, xr, SIGMA_MIN, SIGMA_MAX, generator=torch.Generator().manual_seed(3)
    )
    est = res.log_prob.view(2, reps)
    exact = gaussian.log_prob(x, SIGMA_MIN)
    exact = exact.repeat_interleave(reps).view(2, reps)
    bias = _log_normal(res.z, SIGMA_MAX) - gaussian.log_prob(res.z, SIGMA_MAX)
    err = est - bias.view(2, reps) - exact
    stderr = est.std(1) / math.sqrt(reps)
    assert (est.std(1) > 1e-3).all()  # a stochastic estimate, not the exact trace
    assert (err.mean(1).abs() < 4 * stderr + 2e-4).all()


def test_bits_per_dim_of_dequantized_uint8_matches_exact(gaussian):
    g = torch.Generator().manual_seed(4)
    images = ((gaussian.sample(5, g) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    bpd, nfe = image_bits_per_dim(
        gaussian.denoise,
        images,
        torch.Generator().manual_seed(5),
        dtype=torch.float64,
        divergence="exact",
        sigma_min=SIGMA_MIN,
    )
    z = dequantize(images, torch.Generator().manual_seed(5), torch.float64)
    exact = -gaussian.log_prob(z, SIGMA_MIN) / (4 * math.log(2)) + 7
    # within the prior bias (< 0.05 nats, under 0.01 bits per dim here) of the exact bits/dim
    torch.testing.assert_close(bpd, exact, atol=1e-2, rtol=0)
    assert nfe > 0


def test_bits_per_dim_offset_for_uniform_data():
    # uniform density on [-1, 1]^d is 2^-d: exactly 8 bits per 8-bit pixel
    d = 3
    assert bits_per_dim(torch.tensor([-d * math.log(2.0)]), d).item() == pytest.approx(8.0)


def test_dequantize_stays_in_the_pixel_bin():
    images = torch.arange(256, dtype=torch.uint8).view(1, 256)
    z = dequantize(images, torch.Generator().manual_seed(0), torch.float64)
    k = torch.floor((z + 1) * 128)
    assert torch.equal(k, images.double())
