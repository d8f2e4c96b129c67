"""iDDPM in sigma-space against closed forms: on N(0, I) data the exact denoiser with v = +1 (beta_t)
is the true reverse process, so the vb terms telescope to mutual informations; on point-mass data
v = -1 (beta-tilde) is exact and only the prior and the decoder remain."""

import math

import pytest
import torch
from scipy.stats import norm

from diffusionlab.diffusion import samplers as S
from diffusionlab.diffusion.iddpm import (
    HybridLoss,
    discretized_gaussian_log_likelihood,
    learned_log_variance,
    prior_bits,
    vb_terms,
    vlb_bits_per_dim,
)
from diffusionlab.diffusion.noise import StackedRandomGenerator
from diffusionlab.diffusion.parameterizations import EpsParam
from diffusionlab.diffusion.schedules import DDPMSchedule, get_schedule
from diffusionlab.errors import ConfigError

T, B0, B1 = 40, 1e-3, 0.2


@pytest.fixture(scope="module")
def sched() -> DDPMSchedule:
    return DDPMSchedule(num_steps=T, beta_start=B0, beta_end=B1)


def grid64(sched) -> torch.Tensor:
    return sched.sigma(torch.arange(T, dtype=torch.float64))


def info(sigma: torch.Tensor) -> torch.Tensor:
    """I(x0; x0 + sigma n) per dimension in bits for x0 ~ N(0, 1)."""
    return 0.5 * torch.log2(1 + 1 / sigma**2)


def exact_gauss(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x~] for x0 ~ N(0, I)."""
    return x / (1 + sigma.view(-1, *[1] * (x.ndim - 1)) ** 2)


def test_vb_terms_of_the_true_reverse_process_are_mutual_information_steps(sched):
    """E KL(q(x_{t-1}|x_t,x0) || q(x_{t-1}|x_t)) = I(x0; x_{t-1}) - I(x0; x_t)."""
    g = grid64(sched)
    gen = torch.Generator().manual_seed(0)
    n, dim = 4000, 8
    x0 = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    total = torch.zeros(n, dtype=torch.float64)
    for t in range(1, T):
        x = x0 + g[t] * torch.randn(n, dim, generator=gen, dtype=torch.float64)
        sigma = g[t].expand(n)
        idx = torch.full((n,), t)
        term = vb_terms(g, idx, x0, x, exact_gauss(x, sigma), torch.ones_like(x))
        total += term
        if t in (1, T // 2, T - 1):
            want = info(g[t - 1]) - info(g[t])
            assert abs(term.mean() - want) < 5 * term.std() / n**0.5 + 1e-9, (t, term.mean(), want)
    total += prior_bits(g, x0)
    assert abs(total.mean() - info(g[0])) < 5 * total.std() / n**0.5, (total.mean(), info(g[0]))


def test_point_mass_bound_is_prior_plus_decoder(sched):
    """x0 a fixed 8-bit image and D = x0, v = -1: every KL is 0; the bound is the prior KL and
    the decoder's -log P(bin) with variance posterior_variance[1], both from the betas."""
    betas = torch.linspace(B0, B1, T, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    post_var1 = betas[1] * (1 - abar[0]) / (1 - abar[1])
    x0 = (torch.tensor([0, 37, 128, 255], dtype=torch.float64) / 127.5 - 1).view(1, 4)

    def denoise(x, sigma):
        return x0.expand_as(x), -torch.ones_like(x)

    out = vlb_bits_per_dim(
        denoise, x0.expand(3, 4), sched, torch.Generator().manual_seed(0), clip=False
    )
    prior = 0.5 * (-torch.log(1 - abar[-1]) + (1 - abar[-1]) + abar[-1] * x0**2 - 1)
    b = (1 / 255) / post_var1.sqrt()
    p_mid, p_end = 2 * norm.cdf(b) - 1, norm.cdf(b)
    decoder = -torch.tensor([math.log(p_end), math.log(p_mid), math.log(p_mid), math.log(p_end)])
    want = ((prior + decoder).mean() / math.log(2)).item()
    torch.testing.assert_close(out["bpd"], torch.full((3,), want, dtype=torch.float64))
    assert out["terms"][:, 1:].abs().max() < 1e-9
    want_prior = torch.full((3,), prior.mean().item() / math.log(2), dtype=torch.float64)
    torch.testing.assert_close(out["prior"], want_prior)


def test_discretized_gaussian_is_a_distribution_over_256_bins():
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, std in [(0.0, 0.3), (0.93, 0.01), (-1.2, 0.5), (0.5, 1e-4)]:
        logp = discretized_gaussian_log_likelihood(
            levels, torch.full_like(levels, mean), torch.full_like(levels, math.log(std))
        )
        assert abs(logp.exp().sum().item() - 1) < 1e-9
        k = 200
        ref = norm.cdf(levels[k] + 1 / 255, mean, std) - norm.cdf(levels[k] - 1 / 255, mean, std)
        assert abs(logp[k].exp().item() - ref) < 2e-12  # 1e-12 floor as improved-diffusion


def test_learned_variance_interpolates_log_beta_tilde_and_beta():
    v = torch.tensor([-1.0, 0.0, 1.0])
    out = learned_log_variance(v, math.log(0.01), math.log(0.04))
    torch.testing.assert_close(out.exp(), torch.tensor([0.01, 0.02, 0.04]))


class _Stub(torch.nn.Module):
    """D = a * E[x0 | x~] and v = b: the mean and the variance have separate parameters."""

    def __init__(self, a: float = 1.0, b: float = 1.0) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def forward_with_variance(self, x, sigma, class_labels=None, augment_labels=None):
        x = x.double()
        return self.a * exact_gauss(x, sigma.double()), self.b * torch.ones_like(x)


def test_hybrid_loss_terms_match_closed_forms_and_stop_the_mean_gradient(sched):
    loss = HybridLoss(sched, EpsParam(sched, learned_variance=True))
    g = grid64(sched)
    n, dim, t = 4000, 4, 10
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    noise = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    sigma = g[t].float().expand(n)
    stub = _Stub()
    mse, vb = loss.terms(stub, x0, sigma, noise.float())
    # eps-MSE of the exact denoiser: Var(eps | x~) = 1 / (1 + sigma^2) per dimension
    assert abs(mse.mean() - 1 / (1 + g[t] ** 2)) < 5 * mse.std() / n**0.5
    want = info(g[t - 1]) - info(g[t])
    assert abs(vb.mean() - want) < 5 * vb.std() / n**0.5 + 1e-6
    stub2 = _Stub(a=0.9, b=0.5)
    mse, vb = loss.terms(stub2, x0[:64], sigma[:64], noise[:64].float())
    (grad_a_vb,) = torch.autograd.grad(vb.sum(), stub2.a, allow_unused=True)
    assert grad_a_vb is None or grad_a_vb == 0  # L_vlb does not train the mean
    assert torch.autograd.grad(vb.sum(), stub2.b)[0] != 0
    assert torch.autograd.grad(mse.sum(), stub2.b, allow_unused=True)[0] is None


def test_hybrid_loss_is_simple_plus_lambda_T_vb(sched):
    loss = HybridLoss(sched, EpsParam(sched, learned_variance=True), vlb_weight=0.25)
    x0 = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    total, sigma = loss(_Stub(0.8, 0.3), x0, generator=StackedRandomGenerator(range(6)))
    replay = StackedRandomGenerator(range(6))
    sig2 = loss.noise.sample(6, sched, replay)
    noise = replay.randn_like(x0)
    mse, vb = loss.terms(_Stub(0.8, 0.3), x0, sig2, noise)
    torch.testing.assert_close(sigma, sig2)
    torch.testing.assert_close(total, (mse + 0.25 * T * vb).float())


def test_hybrid_loss_refuses_what_it_cannot_train(sched):
    with pytest.raises(ConfigError, match="learned_variance"):
        HybridLoss(sched, EpsParam(sched))
    edm = get_schedule("edm")
    with pytest.raises(ConfigError, match="discrete schedule"):
        HybridLoss(edm, EpsParam(edm, learned_variance=True))


def test_ddpm_learned_variance_spans_small_and_large(sched):
    """v = -1 / +1 reproduce the fixed beta-tilde / beta samplers; v = 0 their geometric mean."""
    grid = S.sigmas_for_nfe(sched, "ddpm", 8, "linspace")

    def with_v(value):
        def denoise(x, sigma):
            d = exact_gauss(x, sigma)
            d.learned_variance = torch.full_like(x, value)
            return d

        return denoise

    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * grid[0]

    def run(denoise, variance):
        return S.get_sampler("ddpm", variance=variance)(
            denoise, x, grid, generator=torch.Generator().manual_seed(3)
        )

    torch.testing.assert_close(run(with_v(-1.0), "learned"), run(exact_gauss, "small"))
    torch.testing.assert_close(run(with_v(1.0), "learned"), run(exact_gauss, "large"))
    with pytest.raises(ValueError, match="learned_variance=true"):
        run(exact_gauss, "learned")
