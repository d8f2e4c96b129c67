"""Schedules: defining formulas, inverses, monotonicity, derivatives, discrete grids, errors."""

import math

import numpy as np
import pytest
import torch

from diffusionlab.diffusion.schedules import (
    SCHEDULES,
    CosineSchedule,
    DDPMSchedule,
    ShiftedSchedule,
    get_schedule,
)

NAMES = [n for n in SCHEDULES if n != "shifted"]
ALL = [*NAMES, "flow_shift3", "ddpm_shift2", "vp_shift0.5", "ve_geometric"]


def make(name: str):
    if name == "flow_shift3":
        return get_schedule("shifted", base="flow", shift=3.0)
    if name == "ddpm_shift2":
        return get_schedule("ddpm", shift=2.0)
    if name == "vp_shift0.5":
        return ShiftedSchedule(get_schedule("vp"), resolution=32, base_resolution=64)
    if name == "ve_geometric":
        return get_schedule("ve", geometric=True)
    return get_schedule(name)


def interior_t(s, n: int = 101) -> torch.Tensor:
    """Times inside the range, off the integer knots of discrete schedules."""
    if s.discrete:
        return torch.arange(0, s.t_max, 10, dtype=torch.float64) + 0.37
    return torch.linspace(s.t_min, s.t_max, n, dtype=torch.float64)[1:-1]


def test_ddpm_matches_cumprod_of_linear_betas():
    betas = np.linspace(1e-4, 0.02, 1000)
    alpha_bar = np.cumprod(1 - betas)
    s = DDPMSchedule()
    grid = s._log_grid.exp().numpy()
    np.testing.assert_allclose(grid, np.sqrt(1 / alpha_bar - 1), rtol=1e-12)
    t = torch.arange(1000, dtype=torch.float64)
    np.testing.assert_allclose(s.sigma(t).numpy(), grid, rtol=1e-12)
    np.testing.assert_allclose(s.scale(t).numpy() ** 2, alpha_bar, rtol=1e-12)
    assert s.grid.dtype == torch.float32 and len(s.grid) == 1000


def test_cosine_matches_iddpm_with_clipped_betas():
    T, s0 = 1000, 0.008
    f = np.cos((np.arange(T + 1) / T + s0) / (1 + s0) * np.pi / 2) ** 2
    betas = np.minimum(1 - f[1:] / f[:-1], 0.999)
    alpha_bar = np.cumprod(1 - betas)
    s = CosineSchedule()
    np.testing.assert_allclose(s._log_grid.exp().numpy(), np.sqrt(1 / alpha_bar - 1), rtol=1e-10)
    assert betas[-1] == 0.999  # the clip is active at the end


def test_continuous_closed_forms():
    t = torch.tensor([0.01, 0.3, 0.9], dtype=torch.float64)
    vp = get_schedule("vp")
    expected = np.sqrt(np.exp(0.5 * 19.9 * t.numpy() ** 2 + 0.1 * t.numpy()) - 1)
    np.testing.assert_allclose(vp.sigma(t).numpy(), expected, rtol=1e-12)
    assert vp.t_min == 1e-5 and vp.t_max == 1.0
    cos = get_schedule("cosine_continuous")
    ab = (
        np.cos((t.numpy() + 0.008) / 1.008 * np.pi / 2) ** 2
        / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
    )
    np.testing.assert_allclose(cos.sigma(t).numpy(), np.sqrt(1 / ab - 1), rtol=1e-12)
    ve = get_schedule("ve")
    assert ve.sigma_min == pytest.approx(0.02) and ve.sigma_max == pytest.approx(100)
    np.testing.assert_allclose(ve.sigma(t).numpy(), np.sqrt(t.numpy()))
    geo = get_schedule("ve", geometric=True)
    np.testing.assert_allclose(geo.sigma(t).numpy(), 0.02 * 5000 ** t.numpy(), rtol=1e-12)
    edm = get_schedule("edm")
    assert (edm.sigma_min, edm.sigma_max) == (0.002, 80.0)
    assert torch.equal(edm.sigma(t), t) and torch.equal(edm.scale(t), torch.ones_like(t))
    flow = get_schedule("flow")
    np.testing.assert_allclose(flow.sigma(t).numpy(), t.numpy() / (1 - t.numpy()), rtol=1e-12)
    np.testing.assert_allclose(flow.scale(t).numpy(), 1 - t.numpy(), rtol=1e-12)


@pytest.mark.parametrize("name", ["ddpm", "vp", "cosine", "cosine_continuous"])
def test_vp_scale(name):
    s = make(name)
    t = interior_t(s)
    torch.testing.assert_close(s.scale(t), 1 / torch.sqrt(1 + s.sigma(t) ** 2))


@pytest.mark.parametrize("name", ALL)
def test_round_trip_and_monotone(name):
    s = make(name)
    t = interior_t(s)
    sigma = s.sigma(t)
    assert (sigma.diff() > 0).all()
    assert (s.scale(t).diff() <= 0).all()
    torch.testing.assert_close(s.t_of_sigma(sigma), t, rtol=1e-9, atol=1e-9)
    sig = torch.logspace(math.log10(s.sigma_min), math.log10(s.sigma_max), 50, dtype=torch.float64)
    torch.testing.assert_close(s.sigma(s.t_of_sigma(sig)), sig, rtol=1e-9, atol=0)
    assert s.sigma(s.t_min).item() == pytest.approx(s.sigma_min)
    assert 0 < s.sigma_min < s.sigma_max < math.inf


@pytest.mark.parametrize("name", ALL)
def test_derivatives_match_finite_differences(name):
    s = make(name)
    t = interior_t(s, 41)
    h = 1e-6 * (s.t_max - s.t_min)
    fd_sigma = (s.sigma(t + h) - s.sigma(t - h)) / (2 * h)
    fd_scale = (s.scale(t + h) - s.scale(t - h)) / (2 * h)
    torch.testing.assert_close(s.sigma_deriv(t), fd_sigma, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(s.scale_deriv(t), fd_scale, rtol=1e-5, atol=1e-9)


def test_float32_in_float32_out():
    s = get_schedule("vp")
    assert s.sigma(torch.tensor([0.5])).dtype == torch.float32
    assert s.sigma(0.5).dtype == torch.float32


@pytest.mark.parametrize("name", ["ddpm", "cosine", "ddpm_shift2"])
def test_discrete_index(name):
    s = make(name)
    assert s.discrete
    grid = s.grid.double()
    assert (grid.diff() > 0).all()
    idx = torch.arange(1000)
    assert torch.equal(s.sigma_to_index(grid), idx)
    # nearest in log-sigma: just below the geometric midpoint rounds down, just above rounds up
    mid = torch.sqrt(grid[:-1] * grid[1:])
    assert torch.equal(s.sigma_to_index(mid * (1 - 1e-6)), idx[:-1])
    assert torch.equal(s.sigma_to_index(mid * (1 + 1e-6)), idx[1:])
    # out-of-range sigmas clamp to the ends
    assert s.sigma_to_index(torch.tensor([1e-9, 1e9])).tolist() == [0, 999]
    torch.testing.assert_close(s.t_of_sigma(mid), idx[:-1].double() + 0.5)


def test_shift_is_sd3_and_log_snr_shift():
    base, shifted = get_schedule("flow"), get_schedule("flow", shift=3.0)
    t = torch.linspace(0.01, 0.99, 9, dtype=torch.float64)
    torch.testing.assert_close(shifted.sigma(t), 3 * base.sigma(t))
    sd3_t = 3 * t / (1 + 2 * t)  # Esser et al. 2024 eq. 23
    torch.testing.assert_close(shifted.scale(t), 1 - sd3_t)
    log_snr = -2 * torch.log(base.sigma(t))
    torch.testing.assert_close(-2 * torch.log(shifted.sigma(t)), log_snr - 2 * math.log(3))
    res = ShiftedSchedule("vp", resolution=128, base_resolution=64)
    assert res.shift == 2.0 and res.scale_kind == "vp"


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: get_schedule("nope"), "schedule='nope'"),
        (lambda: get_schedule("edm", sigma_min=1.0, sigma_max=0.5), "sigma_min=1.0"),
        (lambda: get_schedule("edm", sigma_min=-1.0), "sigma_min=-1.0"),
        (lambda: get_schedule("ve", sigma_min=10.0, sigma_max=10.0), "sigma_min=10.0"),
        (lambda: get_schedule("ddpm", beta_start=0.03), "beta_start=0.03"),
        (lambda: get_schedule("ddpm", num_steps=1), "num_steps=1"),
        (lambda: get_schedule("cosine", max_beta=1.5), "max_beta=1.5"),
        (lambda: get_schedule("vp", beta_d=-1.0), "beta_d=-1.0"),
        (lambda: get_schedule("flow", t_max=1.0), "t_max=1.0"),
        (lambda: get_schedule("flow", shift=0.0), "shift=0.0"),
        (lambda: get_schedule("shifted", base="edm"), "shift=None"),
    ],
)
def test_bad_config_raises_value_error(build, key):
    with pytest.raises(ValueError, match=key.replace("(", r"\(")) as info:
        build()
    if "nope" in key:
        assert "ddpm" in str(info.value) and "flow" in str(info.value)
