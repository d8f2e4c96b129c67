"""Classifier-free guidance / autoguidance wrappers."""

import math

import pytest
import torch

from diffusionlab.diffusion import samplers as S
from diffusionlab.diffusion.analytic import Gaussian
from diffusionlab.diffusion.discretizations import karras
from diffusionlab.diffusion.guidance import (
    cfg_denoiser,
    check_guidance_interval,
    conditional_pair,
    interval_denoiser,
    label_cfg_denoiser,
)
from diffusionlab.errors import ConfigError

COND = Gaussian(torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor([0.2, 0.3]))
UNCOND = Gaussian(torch.tensor([0.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 1.0]))


def test_cfg_formula_and_limits():
    x, s = torch.randn(4, 2, dtype=torch.float64), torch.full((4,), 0.7, dtype=torch.float64)
    torch.testing.assert_close(cfg_denoiser(COND, UNCOND, 1.0)(x, s), COND(x, s))
    torch.testing.assert_close(cfg_denoiser(COND, UNCOND, 0.0)(x, s), UNCOND(x, s))
    want = UNCOND(x, s) + 2.5 * (COND(x, s) - UNCOND(x, s))
    torch.testing.assert_close(cfg_denoiser(COND, UNCOND, 2.5)(x, s), want)


def _labelled(x, sigma, labels):
    """Toy class-conditional denoiser: label k pulls towards mean k; zero label = unconditional."""
    means = torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=x.dtype)
    mu = labels.to(x.dtype) @ means
    s2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1) ** 2
    return mu + (x - mu) / (1 + s2)


def test_label_pair_and_batched_cfg_agree():
    labels = torch.nn.functional.one_hot(torch.tensor([0, 1, 1]), 2).float()
    x, s = torch.randn(3, 2, dtype=torch.float64), torch.full((3,), 1.3, dtype=torch.float64)
    cond, uncond = conditional_pair(_labelled, labels)
    torch.testing.assert_close(uncond(x, s), x / (1 + 1.3**2))
    torch.testing.assert_close(
        label_cfg_denoiser(_labelled, labels, 3.0)(x, s), cfg_denoiser(cond, uncond, 3.0)(x, s)
    )


def test_guided_denoiser_plugs_into_every_sampler_and_counts_one_nfe_per_call():
    guided = cfg_denoiser(COND, UNCOND, 2.0)
    calls = []

    def counted(x, sigma):
        calls.append(1)
        return guided(x, sigma)

    for name in S.SAMPLERS:
        calls.clear()
        # annealed Langevin: 2 levels of 4 steps, its step size fit to sigma_min = 0.01
        opts = {"steps_per_level": 4, "eps": 1e-5} if name == "annealed_langevin" else {}
        smp = S.get_sampler(name, **opts)
        sig = karras(S.steps_for_nfe(name, 10, **opts), 0.01, 10.0)
        out = smp(
            counted,
            torch.randn(8, 2, dtype=torch.float64) * 10,
            sig,
            generator=torch.Generator().manual_seed(0),
        )
        assert bool(torch.isfinite(out).all()) and smp.nfe == len(calls)


def test_guidance_sharpens_towards_the_condition():
    """w > 1 moves the ODE endpoint of a Gaussian pair past the conditional mean."""
    sig = karras(30, 0.01, 10.0)
    x = torch.randn(2000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 10
    out1 = S.get_sampler("heun")(cfg_denoiser(COND, UNCOND, 1.0), x, sig)
    out3 = S.get_sampler("heun")(cfg_denoiser(COND, UNCOND, 3.0), x, sig)
    assert (out3.mean(0) > out1.mean(0)).all()
    torch.testing.assert_close(
        out1, COND(COND.ode_solution(x, 10.0, 0.01), 0.01), atol=0.03, rtol=0
    )


def test_guidance_keeps_the_conditional_learned_variance():
    """iDDPM's ddpm sampler reads D.learned_variance: both wrappers pass the conditional one on."""
    x, s = torch.randn(3, 2, dtype=torch.float64), torch.full((3,), 0.7, dtype=torch.float64)

    def with_v(value):
        def denoise(x, sigma, labels=None):
            d = x * 0.5 + (0.0 if labels is None else labels.sum(1, keepdim=True))
            d.learned_variance = torch.full_like(x, value) + (
                0 if labels is None else labels[:, :1]
            )
            return d

        return denoise

    guided = cfg_denoiser(with_v(0.3), with_v(-0.9), 2.0)(x, s)
    torch.testing.assert_close(guided.learned_variance, torch.full_like(x, 0.3))
    labels = torch.tensor([[1.0, 0.0]] * 3, dtype=torch.float64)
    guided = label_cfg_denoiser(with_v(0.3), labels, 2.0)(x, s)
    torch.testing.assert_close(guided.learned_variance, torch.full_like(x, 1.3))  # cond half


def _counted(denoise, calls: list, name: str):
    def wrapped(x, sigma):
        calls.append(name)
        return denoise(x, sigma)

    return wrapped


def test_guidance_interval_is_plain_outside_and_cfg_inside():
    """Kynkaanniemi et al. 2024: guided for sigma in (lo, hi] (lo excluded, hi included), the
    conditional model elsewhere, decided per sample."""
    guided = cfg_denoiser(COND, UNCOND, 3.0)
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.1, 0.5, 2.0, 5.0, 10.0], dtype=torch.float64)
    out = interval_denoiser(guided, COND, 0.5, 5.0)(x, sigma)
    inside = torch.tensor([False, False, True, True, False])
    torch.testing.assert_close(out[inside], guided(x, sigma)[inside])
    torch.testing.assert_close(out[~inside], COND(x, sigma)[~inside])
    assert (guided(x, sigma) - COND(x, sigma)).abs().min() > 1e-3  # the two sides differ


def test_guidance_interval_evaluates_one_side_when_the_batch_agrees():
    """A whole batch outside the interval costs the conditional model alone (one network
    evaluation instead of two), a whole batch inside only the guided one."""
    calls: list[str] = []
    denoise = interval_denoiser(
        _counted(cfg_denoiser(COND, UNCOND, 2.0), calls, "guided"),
        _counted(COND, calls, "plain"),
        0.3,
        3.0,
    )
    x = torch.randn(4, 2, dtype=torch.float64)
    for s, want in ((0.2, ["plain"]), (3.0, ["guided"]), (10.0, ["plain"])):
        calls.clear()
        denoise(x, torch.full((4,), s, dtype=torch.float64))
        assert calls == want, s
    calls.clear()
    denoise(x, torch.tensor(1.0, dtype=torch.float64))  # a scalar sigma, as samplers pass it
    assert calls == ["guided"]


def test_guidance_interval_in_a_sampler_equals_switching_by_hand():
    """Heun with the interval = Heun with a denoiser that switches on sigma itself; the full
    interval is CFG and an empty one (above sigma_max) is the conditional model."""
    sig = karras(10, 0.01, 10.0)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 10
    guided = cfg_denoiser(COND, UNCOND, 3.0)
    heun = S.get_sampler("heun")

    def by_hand(x, sigma):
        s = float(torch.as_tensor(sigma).reshape(-1)[0])
        return guided(x, sigma) if 0.2 < s <= 2.0 else COND(x, sigma)

    torch.testing.assert_close(
        heun(interval_denoiser(guided, COND, 0.2, 2.0), x, sig), heun(by_hand, x, sig)
    )
    torch.testing.assert_close(
        heun(interval_denoiser(guided, COND, 0, math.inf), x, sig), heun(guided, x, sig)
    )
    torch.testing.assert_close(
        heun(interval_denoiser(guided, COND, 20, 30), x, sig), heun(COND, x, sig)
    )
    assert (heun(by_hand, x, sig) - heun(guided, x, sig)).abs().max() > 1e-3


def test_check_guidance_interval():
    assert check_guidance_interval(None) is None
    assert check_guidance_interval([0.28, 5.42]) == (0.28, 5.42)
    assert check_guidance_interval(["0", "inf"]) == (0.0, math.inf)
    for bad in ([5, 1], [-1, 2], [1, 1], [1, float("nan")]):
        with pytest.raises(
            ConfigError, match=r"sample_grid.guidance_interval=.*sigma_lo < sigma_hi"
        ):
            check_guidance_interval(bad, "sample_grid.guidance_interval")
    for bad in ([1], [1, 2, 3], "abc", 3.0):
        with pytest.raises(
            ConfigError, match=r"guidance_interval=.*must be \[sigma_lo, sigma_hi\]"
        ):
            check_guidance_interval(bad)
