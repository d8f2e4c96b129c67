"""Sigma grids: closed-form values, DDPM respacing indices, snapping and NFE budgets."""

import math

import pytest
import torch

from diffusionlab.diffusion import discretizations as dz
from diffusionlab.diffusion.samplers import sigmas_for_nfe
from diffusionlab.diffusion.schedules import get_schedule


def test_karras_matches_edm_eq5():
    sig = dz.karras(5, 0.002, 80.0, rho=7.0)
    i = torch.arange(5, dtype=torch.float64)
    want = (80.0 ** (1 / 7) + i / 4 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    torch.testing.assert_close(sig[:-1], want)
    assert sig[-1] == 0 and sig[0] == pytest.approx(80.0) and sig[-2] == pytest.approx(0.002)
    assert dz.karras(1, 0.002, 80.0).tolist() == [pytest.approx(80.0), 0.0]


def test_rho_one_is_uniform_in_sigma():
    diffs = dz.karras(6, 1.0, 11.0, rho=1.0)[:-1].diff()
    torch.testing.assert_close(diffs, torch.full((5,), -2.0, dtype=torch.float64))


def test_logsnr_is_geometric():
    sig = dz.logsnr(7, 0.01, 100.0)[:-1]
    ratios = sig[1:] / sig[:-1]
    torch.testing.assert_close(ratios, torch.full((6,), 10 ** (-4 / 6), dtype=torch.float64))


def test_time_uniform_follows_schedule_time():
    edm = get_schedule("edm")  # sigma = t
    sig = dz.time_uniform(edm, 5)[:-1]
    torch.testing.assert_close(
        sig.diff(), torch.full((4,), sig.diff()[0].item(), dtype=torch.float64)
    )
    vp = get_schedule("vp")
    t = vp.t_of_sigma(dz.time_uniform(vp, 6)[:-1].double())
    torch.testing.assert_close(
        t.diff(), torch.full((5,), float(t.diff()[0]), dtype=t.dtype), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize(
    "spacing,want",
    [
        ("leading", [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
        ("linspace", [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
        ("trailing", [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
    ],
)
def test_ddpm_respacing_indices(spacing, want):
    """The index sets of DDIM/diffusers 'leading', 'linspace' and Lin et al.'s 'trailing'."""
    sch = get_schedule("ddpm")
    sig = dz.get_sigmas(spacing, 10, sch)
    torch.testing.assert_close(sig[:-1], sch.grid.double()[want])
    assert sig[-1] == 0


def test_snap_to_grid_lands_on_grid_and_dedupes():
    sch = get_schedule("ddpm")
    sig = dz.snap_to_grid(dz.karras(50, sch.sigma_min, sch.sigma_max), sch.grid)
    grid = sch.grid.double()
    assert all(bool((grid == s).any()) for s in sig[:-1])
    assert bool((sig[:-1].diff() < 0).all()) and sig[-1] == 0
    dense = dz.snap_to_grid(dz.karras(3000, sch.sigma_min, sch.sigma_max), sch.grid)
    assert len(dense) <= len(grid) + 1
    snapped = sigmas_for_nfe(sch, "euler", 20, snap=True)
    assert len(snapped) == 21 and all(bool((grid == s).any()) for s in snapped[:-1])


@pytest.mark.parametrize(
    "sampler,nfe,n",
    [("heun", 35, 18), ("heun", 10, 5), ("euler", 10, 10), ("plms", 10, 9), ("dpmpp_2s", 1, 1)],
)
def test_sigmas_for_nfe_counts(sampler, nfe, n):
    sig = sigmas_for_nfe(get_schedule("edm"), sampler, nfe, "karras")
    assert len(sig) == n + 1


@pytest.mark.parametrize("name", ["karras", "time_uniform", "logsnr"])
@pytest.mark.parametrize("schedule", ["ddpm", "vp", "cosine", "ve", "edm", "flow"])
def test_every_schedule_gives_valid_grid(name, schedule):
    sch = get_schedule(schedule)
    sig = dz.get_sigmas(name, 12, sch)
    assert sig.dtype == torch.float64 and len(sig) == 13 and sig[-1] == 0
    assert bool((sig[:-1].diff() < 0).all())
    assert math.isclose(float(sig[0]), sch.sigma_max, rel_tol=1e-4)
    assert math.isclose(float(sig[-2]), sch.sigma_min, rel_tol=1e-4)


def test_errors_name_valid_choices():
    with pytest.raises(ValueError, match="valid: karras, time_uniform, logsnr"):
        dz.get_sigmas("cosine", 10, get_schedule("edm"))
    with pytest.raises(ValueError, match=">= 1"):
        dz.karras(0, 0.1, 1.0)
    with pytest.raises(ValueError, match="discrete schedule"):
        dz.get_sigmas("trailing", 10, get_schedule("edm"))
    with pytest.raises(ValueError, match="valid: leading, linspace, trailing"):
        dz.ddpm_respacing(get_schedule("ddpm").grid, 10, "middle")
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        dz.get_sigmas("karras", 10, sigma_min=2.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="valid: euler"):
        sigmas_for_nfe(get_schedule("edm"), "rk4", 10)
