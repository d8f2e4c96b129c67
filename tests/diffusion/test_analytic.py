"""Closed-form denoisers: Tweedie consistency, exact ODE flow, densities and samplers."""

import pytest
import torch
from torch.distributions import MultivariateNormal

from diffusionlab.diffusion.analytic import Gaussian, GaussianMixture

COV = torch.tensor([[1.0, 0.4, 0.0], [0.4, 0.6, 0.1], [0.0, 0.1, 0.2]], dtype=torch.float64)
MU = torch.tensor([0.3, -0.2, 1.0], dtype=torch.float64)


@pytest.fixture
def gmm() -> GaussianMixture:
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]], dtype=torch.float64)
    covs = torch.tensor(
        [[[0.3, 0.1], [0.1, 0.2]], [[0.1, 0.0], [0.0, 0.4]], [[0.2, -0.05], [-0.05, 0.1]]]
    )
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2]), means, covs.double())


def test_gaussian_denoiser_closed_form():
    g = Gaussian(MU, COV)
    x = torch.randn(5, 3, dtype=torch.float64)
    want = MU + (x - MU) @ torch.linalg.solve(COV + 0.7**2 * torch.eye(3, dtype=torch.float64), COV)
    torch.testing.assert_close(g(x, 0.7), want)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0])
def test_tweedie_denoiser_is_score_of_log_prob(gmm, sigma):
    """D(x; sigma) = x + sigma^2 grad log p_sigma(x) for mixtures too."""
    x = (torch.randn(7, 2, dtype=torch.float64) * 2).requires_grad_()
    (grad,) = torch.autograd.grad(gmm.log_prob(x, sigma).sum(), x)
    torch.testing.assert_close(gmm(x.detach(), sigma), x.detach() + sigma**2 * grad)
    torch.testing.assert_close(gmm.score(x.detach(), sigma), grad)


def test_log_prob_matches_torch_mvn():
    g = Gaussian(MU, COV)
    x = torch.randn(6, 3, dtype=torch.float64)
    want = MultivariateNormal(MU, COV + 0.3**2 * torch.eye(3, dtype=torch.float64)).log_prob(x)
    torch.testing.assert_close(g.log_prob(x, 0.3), want)


def test_diagonal_equals_full_and_per_sample_sigma():
    diag = Gaussian(MU, torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64))
    full = Gaussian(MU, torch.diag(torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64)))
    x = torch.randn(4, 3, dtype=torch.float64)
    sig = torch.tensor([0.1, 0.5, 1.0, 5.0], dtype=torch.float64)
    torch.testing.assert_close(diag(x, sig), full(x, sig))
    rows = torch.stack([full(x[i : i + 1], float(sig[i]))[0] for i in range(4)])
    torch.testing.assert_close(full(x, sig), rows)


def test_ode_solution_solves_the_pf_ode():
    """x(sigma0) is the identity and dx/dsigma = (x - D(x; sigma)) / sigma (EDM eq. 4)."""
    g = Gaussian(MU, COV)
    x = torch.randn(5, 3, dtype=torch.float64) * 2
    torch.testing.assert_close(g.ode_solution(x, 2.0, 2.0), x)
    s, h = 0.8, 1e-5
    xs = g.ode_solution(x, 2.0, s)
    deriv = (g.ode_solution(x, 2.0, s + h) - g.ode_solution(x, 2.0, s - h)) / (2 * h)
    torch.testing.assert_close(deriv, (xs - g(xs, s)) / s, rtol=1e-6, atol=1e-7)
    back = g.ode_solution(g.ode_solution(x, 2.0, 0.1), 0.1, 2.0)
    torch.testing.assert_close(back, x)


def test_ode_solution_pushes_marginals():
    """The flow maps N(mu, C + s0^2) onto N(mu, C + s^2)."""
    g = Gaussian(MU, COV)
    x = g.sample(20000, torch.Generator().manual_seed(0), sigma=3.0)
    y = g.ode_solution(x, 3.0, 0.0)
    torch.testing.assert_close(torch.cov(y.T), COV, atol=0.05, rtol=0.05)


def test_samples_match_moments(gmm):
    x = gmm.sample(40000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(x.mean(0), gmm.mean, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), gmm.cov, atol=0.05, rtol=0.03)


def test_single_component_mixture_is_gaussian():
    mix = GaussianMixture(torch.ones(1), MU[None], COV[None])
    x = torch.randn(3, 3, dtype=torch.float64)
    torch.testing.assert_close(mix(x, 0.4), Gaussian(MU, COV)(x, 0.4))


def test_image_shaped_inputs_roundtrip():
    g = Gaussian(torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    assert g(x, 1.0).shape == x.shape
    torch.testing.assert_close(g(x, 1.0), x / 2)


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.tensor([1.0, -1.0]), torch.zeros(2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="covs must be"):
        GaussianMixture(torch.ones(2), torch.zeros(2, 2), torch.ones(3))
