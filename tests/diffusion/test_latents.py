"""PF-ODE inversion against the closed-form Gaussian flow, and slerp's closed forms."""

import math

import pytest
import torch

from diffusionlab.diffusion import discretizations as dz
from diffusionlab.diffusion.analytic import Gaussian
from diffusionlab.diffusion.latents import invert_ode, slerp
from diffusionlab.diffusion.samplers import get_sampler, steps_for_nfe

SMIN, SMAX = 0.002, 80.0


@pytest.fixture(scope="module")
def gauss() -> Gaussian:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64, generator=g)
    return Gaussian(torch.zeros(6, dtype=torch.float64) + 0.1, a @ a.T / 6 + 0.1 * torch.eye(6))


def test_inversion_is_the_closed_form_flow_and_round_trips(gauss):
    """Heun inversion on 400 sigmas lands on the exact ODE map x(0) -> x(sigma_max) (relative
    error < 2e-4); sampling it back with Heun on the same grid (799 NFE) reconstructs x0 within
    1e-4 (max abs), and coarser grids reconstruct worse (second order: x16 per 4x fewer steps)."""
    x0 = gauss.sample(32, torch.Generator().manual_seed(1))
    errors = {}
    for nfe in (15, 35, 799):
        sig = dz.karras(steps_for_nfe("heun", nfe), SMIN, SMAX)
        z = invert_ode(gauss, x0, sig)
        if nfe == 799:
            ref = gauss.ode_solution(x0, 0.0, SMAX)
            assert ((z - ref).norm(dim=1) / ref.norm(dim=1)).max() < 2e-4
        back = get_sampler("heun")(gauss, z, sig)
        errors[nfe] = float((back - x0).abs().max())
    assert errors[799] < 1e-4
    assert errors[799] < errors[35] < errors[15]


def test_euler_inversion_nfe_and_bad_solver(gauss):
    calls = []

    def counting(x, sigma):
        calls.append(float(sigma[0]))
        return gauss(x, sigma)

    sig = dz.karras(10, SMIN, SMAX)
    invert_ode(counting, gauss.sample(2), sig, solver="euler")
    assert len(calls) == 9 and calls == sorted(calls)
    calls.clear()
    invert_ode(counting, gauss.sample(2), sig)
    assert len(calls) == 18
    with pytest.raises(ValueError, match="inversion solver"):
        invert_ode(gauss, gauss.sample(2), sig, solver="rk4")


def test_slerp_closed_forms():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    # orthogonal unit vectors: the quarter circle cos(t pi/2) e0 + sin(t pi/2) e1, norm 1
    e0, e1 = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    for t in torch.linspace(0, 1, 7).tolist():
        ref = torch.tensor([[math.cos(t * math.pi / 2), math.sin(t * math.pi / 2), 0.0]])
        assert torch.allclose(slerp(e0, e1, t), ref, atol=1e-6)
    # equal norms keep the norm all along the path
    b_scaled = b * (a.flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).reshape(-1, 1, 1, 1)
    for t in (0.25, 0.5, 0.9):
        norms = slerp(a, b_scaled, t).flatten(1).norm(dim=1)
        assert torch.allclose(norms, a.flatten(1).norm(dim=1), rtol=1e-5)
    # parallel inputs fall back to linear interpolation; one t per sample broadcasts
    assert torch.allclose(slerp(e0, 3 * e0, 0.5), 2 * e0)
    ts = torch.tensor([0.0, 1.0])
    assert torch.equal(slerp(torch.cat([e0, e0]), torch.cat([e1, e1]), ts), torch.cat([e0, e1]))
    with pytest.raises(ValueError, match="equal shapes"):
        slerp(e0, a, 0.5)
