"""Classifier-free guidance / autoguidance wrappers."""

import torch

from diffusionlab.diffusion import samplers as S
from diffusionlab.diffusion.analytic import Gaussian
from diffusionlab.diffusion.discretizations import karras
from diffusionlab.diffusion.guidance import cfg_denoiser, conditional_pair, label_cfg_denoiser

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
