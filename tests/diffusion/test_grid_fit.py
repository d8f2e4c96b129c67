"""Learned sigma grids: gradients through every deterministic sampler, the monotone
parameterisation, and fits on a closed-form Gaussian measured against its exact PF-ODE solution."""

from __future__ import annotations

import math

import pytest
import torch

from diffusionlab.diffusion import discretizations as dz
from diffusionlab.diffusion import fit_discretization
from diffusionlab.diffusion import samplers as S
from diffusionlab.diffusion.analytic import Gaussian
from diffusionlab.diffusion.grid_fit import MonotoneGrid

DETERMINISTIC = [
    ("euler", {}),
    ("heun", {}),
    ("edm", {}),
    ("ddim", {}),
    ("dpmpp_2m", {}),
    ("dpmpp_2m", {"solver_type": "heun"}),
    ("dpmpp_3m", {}),
    ("dpmpp_2s", {}),
    ("unipc", {}),
    ("unipc", {"order": 2, "variant": "bh1"}),
    ("lms", {}),
    ("plms", {}),
]


def _gaussian(d: int = 4) -> Gaussian:
    return Gaussian(
        torch.linspace(-1, 1, d, dtype=torch.float64),
        torch.logspace(-2, 0.5, d, dtype=torch.float64),
    )


@pytest.mark.parametrize(("name", "options"), DETERMINISTIC)
def test_tensor_grid_gives_the_same_output_and_its_finite_difference_gradient(name, options):
    """A grid that requires grad runs the same arithmetic (to 1e-12) and its autograd gradient
    equals central finite differences of the float path."""
    g = _gaussian()
    z = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    base = dz.karras(6, 0.01, 40.0)
    smp = S.get_sampler(name, **options)
    target = g.ode_solution(z * 40.0, 40.0, 0.0)

    def loss(sig: torch.Tensor) -> torch.Tensor:
        return (smp(g, z * 40.0, sig) - target).pow(2).sum()

    sig = base.clone().requires_grad_(True)
    value = loss(sig)
    value.backward()
    assert float(value.detach()) == pytest.approx(float(loss(base)), rel=1e-12)
    for i in range(1, 5):  # interior sigmas
        eps = 1e-6 * float(base[i])
        up, down = base.clone(), base.clone()
        up[i] += eps
        down[i] -= eps
        fd = (float(loss(up)) - float(loss(down))) / (2 * eps)
        assert float(sig.grad[i]) == pytest.approx(fd, rel=1e-4, abs=1e-6)
    assert float(sig.grad[1:5].abs().sum()) > 0


def test_monotone_grid_reproduces_its_start_and_stays_in_bounds():
    start = dz.karras(7, 0.002, 80.0)
    fixed = MonotoneGrid(start).requires_grad_(False)
    assert torch.allclose(fixed(), start, rtol=1e-12, atol=0)
    assert float(fixed()[0]) == 80.0 and float(fixed()[-2]) == pytest.approx(0.002, rel=1e-15)
    free = MonotoneGrid(start, bounds=(0.001, 100.0))
    assert torch.allclose(free()[1:-2], start[1:-2], rtol=1e-12)
    for seed in range(5):  # any logits: strictly decreasing, inside the bounds, final 0
        with torch.no_grad():
            free.logits.copy_(3 * torch.randn(8, generator=torch.Generator().manual_seed(seed)))
        sig = free().detach()
        S.check_sigmas(sig)
        assert float(sig[-2]) > 0.001 and float(sig[0]) < 100.0 and len(sig) == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fit_beats_its_start_on_held_out_draws_and_the_exact_solution(dtype):
    g = _gaussian()
    fit = fit_discretization(
        g, (4,), "dpmpp_2m", 5, teacher_nfe=80, num_samples=32, steps=40, lr=0.1, dtype=dtype
    )
    S.check_sigmas(fit.sigmas)
    assert float(fit.sigmas[-1]) == 0.0 and len(fit.sigmas) == 6
    assert float(fit.sigmas[0]) == 80.0  # fixed ends by default
    assert fit.heldout_after <= 0.5 * fit.heldout_before
    z = torch.randn(256, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    exact = g.ode_solution(z * 80.0, 80.0, 0.0)

    def err(sig: torch.Tensor) -> float:
        return float((S.get_sampler("dpmpp_2m")(g, z * 80.0, sig) - exact).norm(dim=1).mean())

    assert err(fit.sigmas) < 0.5 * err(fit.initial)
    assert fit.settings["dtype"] == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize(("name", "init"), [("euler", "logsnr"), ("heun", "karras")])
def test_fitting_never_makes_the_held_out_error_worse(name, init):
    """Zero steps returns the start exactly; a short fit with learned ends keeps or improves it."""
    g = _gaussian()
    kw = dict(teacher_nfe=60, num_samples=16, dtype=torch.float64, init=init)
    none = fit_discretization(g, (4,), name, 6, steps=0, **kw)
    assert torch.equal(none.sigmas, none.initial)
    assert none.heldout_after == none.heldout_before
    fit = fit_discretization(g, (4,), name, 6, steps=15, bounds=(0.002, 80.0), **kw)
    assert fit.heldout_after <= fit.heldout_before
    assert float(fit.sigmas[-2]) >= 0.002 and float(fit.sigmas[0]) <= 80.0


def test_soft_teacher_forcing_and_minibatches_run():
    fit = fit_discretization(
        _gaussian(), (4,), "unipc", 5, teacher_nfe=40, num_samples=16, batch_size=8,
        steps=6, radius=0.01, eval_every=3, dtype=torch.float64,
    )  # fmt: skip
    assert len(fit.history) == 3 and fit.settings["radius"] == 0.01
    assert fit.heldout_after <= fit.heldout_before


def test_stochastic_and_adaptive_samplers_and_bad_inits_are_refused():
    g = _gaussian()
    for name in ("euler_ancestral", "rk45"):
        with pytest.raises(ValueError, match="deterministic"):
            fit_discretization(g, (4,), name, 5, steps=1)
    with pytest.raises(ValueError, match="deterministic"):
        fit_discretization(g, (4,), S.get_sampler("edm", S_churn=10.0), 5, steps=1)
    with pytest.raises(ValueError, match="init has 3 steps"):
        fit_discretization(g, (4,), "euler", 5, init=dz.karras(3, 0.01, 80.0), steps=1)


def test_learned_discretization_checks_its_length():
    grid = dz.karras(4, 0.002, 80.0)
    assert torch.equal(dz.get_sigmas("learned", 4, sigmas=grid.tolist()), grid)
    with pytest.raises(ValueError, match="has 4 steps; this budget needs 5"):
        dz.get_sigmas("learned", 5, sigmas=grid.tolist())
    with pytest.raises(ValueError, match="needs a fitted grid"):
        dz.get_sigmas("learned", 4)
    assert math.isclose(float(grid[0]), 80.0)
