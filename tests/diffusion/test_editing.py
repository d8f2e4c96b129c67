"""SDEdit and RePaint against closed forms of Gaussian data."""

import pytest
import torch

from diffusionlab.diffusion import discretizations as dz
from diffusionlab.diffusion.analytic import Gaussian
from diffusionlab.diffusion.editing import repaint, sdedit, truncate_sigmas
from diffusionlab.diffusion.noise import StackedRandomGenerator
from diffusionlab.diffusion.samplers import get_sampler

SMIN, SMAX = 0.002, 80.0


@pytest.fixture(scope="module")
def gauss() -> Gaussian:
    """A 2x2 'image' (d = 4) with strongly correlated pixels."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, dtype=torch.float64, generator=g)
    cov = a @ a.T / 4 + 0.05 * torch.eye(4, dtype=torch.float64)
    return Gaussian(torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64), cov)


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(
        n, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )


def test_truncate_sigmas():
    sig = dz.karras(5, SMIN, SMAX)
    out = truncate_sigmas(sig, 1.0)
    assert out[0] == 1.0 and torch.equal(out[1:], sig[sig < 1.0])
    assert torch.equal(truncate_sigmas(sig, 1e-4), torch.tensor([1e-4, 0.0], dtype=sig.dtype))
    with pytest.raises(ValueError, match="sigma_start"):
        truncate_sigmas(sig, 0.0)


def test_sdedit_small_sigma_returns_input(gauss):
    x0 = _images(8)
    heun = get_sampler("heun")
    sig = dz.karras(18, SMIN, SMAX)
    assert torch.equal(sdedit(gauss, x0, 0.0, sig, heun), x0)
    out = sdedit(gauss, x0, 1e-3, sig, heun, StackedRandomGenerator(range(8)))
    assert (out - x0).abs().max() < 5e-3


def test_sdedit_is_the_exact_ode_from_the_perturbed_input(gauss):
    """Deterministic sampler at high NFE: x0 + s n carried by the closed-form PF-ODE down to
    sigma_min, then the sampler's last (Euler) step D(x; sigma_min)."""
    x0, s = _images(16), 2.0
    seeds = list(range(16))
    out = sdedit(
        gauss, x0, s, dz.karras(800, SMIN, SMAX), get_sampler("heun"), StackedRandomGenerator(seeds)
    )
    noisy = x0 + s * StackedRandomGenerator(seeds).randn_like(x0)
    ref = gauss(gauss.ode_solution(noisy, s, SMIN), SMIN)
    assert (out - ref).abs().max() < 1e-4


def test_sdedit_large_sigma_forgets_input(gauss):
    """At sigma_edit = 80 two different inputs with the same seeds end at the same sample (the
    closed-form flow contracts x0 differences by sqrt(lambda / (lambda + 80^2)) < 0.02)."""
    a, b = _images(16, 1), _images(16, 2)
    sig, heun = dz.karras(30, SMIN, SMAX), get_sampler("heun")
    out_a = sdedit(gauss, a, SMAX, sig, heun, StackedRandomGenerator(range(16)))
    out_b = sdedit(gauss, b, SMAX, sig, heun, StackedRandomGenerator(range(16)))
    assert (out_a - out_b).norm() < 0.02 * (a - b).norm()
    near = sdedit(gauss, a, 0.05, sig, heun, StackedRandomGenerator(range(16)))
    assert (near - a).norm() < 0.2 * (a - b).norm()


def test_repaint_keeps_known_pixels_bitwise(gauss):
    x = _images(6).float()
    mask = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    mask[..., :, :1] = True  # left half generated

    def denoise(x, sigma):
        return gauss(x.double(), sigma.double()).float()

    out = repaint(
        denoise,
        x,
        mask,
        dz.karras(6, SMIN, SMAX).float(),
        resample=3,
        generator=StackedRandomGenerator(range(6)),
    )
    keep = ~mask.expand_as(x)
    assert torch.equal(out[keep], x[keep])
    assert not torch.allclose(out[~keep], x[~keep])


def test_repaint_resampling_approaches_the_conditional_gaussian(gauss):
    """Inpainting pixel 0 given pixels 1..3 of Gaussian data should sample N(mu_0|rest, C_0|rest)
    (Schur complement). Replacement alone (U = 1) is far off (variance x2 here); U = 10
    resampling rounds bring mean and variance much closer (RePaint, Sec. 4.2), not exactly."""
    n = 4000
    x_known = gauss.means[0].reshape(1, 1, 2, 2).expand(n, 1, 2, 2).clone()
    x_known[:, 0, 1, 1] += 1.0  # condition on a point off the mean
    mask = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    mask[0, 0, 0, 0] = True
    c, mu = gauss.cov, gauss.means[0]
    w = torch.linalg.solve(c[1:, 1:], c[1:, 0])
    mean = float(mu[0] + w @ (x_known[0].flatten()[1:] - mu[1:]))
    var = float(c[0, 0] - c[0, 1:] @ w)
    err = {}
    for u in (1, 10):
        out = repaint(
            gauss,
            x_known,
            mask,
            dz.karras(12, SMIN, SMAX),
            resample=u,
            generator=torch.Generator().manual_seed(0),
        )[:, 0, 0, 0]
        err[u] = abs(float(out.mean()) - mean), abs(float(out.var()) / var - 1)
    assert err[1][1] > 0.5 and err[10][1] < 0.3
    assert err[10][0] < 0.75 * err[1][0]


def test_results_do_not_depend_on_the_batch(gauss):
    """Per-sample seeds: four inputs in one batch equal the same inputs in two batches of two."""
    x = _images(4)
    mask = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    mask[..., 0, :] = True
    sig, euler = dz.karras(5, SMIN, SMAX), get_sampler("euler_ancestral")

    def both(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        gen = StackedRandomGenerator([10 + i for i in idx])
        edited = sdedit(gauss, x[idx], 3.0, sig, euler, gen)
        gen = StackedRandomGenerator([10 + i for i in idx])
        return edited, repaint(gauss, x[idx], mask, sig, resample=2, generator=gen)

    whole = both([0, 1, 2, 3])
    halves = [torch.cat(t) for t in zip(both([0, 1]), both([2, 3]), strict=True)]
    for a, b in zip(whole, halves, strict=True):
        assert torch.allclose(a, b, atol=1e-12)
