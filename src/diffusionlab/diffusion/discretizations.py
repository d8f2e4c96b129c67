"""Sigma grids for samplers: decreasing 1-D tensors of positive sigmas that end with a final 0.

Every function takes the number of positive sigmas ``n`` (a sampler takes ``n`` steps, the last one
to sigma = 0); :func:`get_sigmas` dispatches by name and :func:`snap_to_grid` moves a grid onto a
discrete schedule's sigmas.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

DISCRETIZATIONS = (
    "karras",
    "time_uniform",
    "logsnr",
    "leading",
    "linspace",
    "trailing",
    "learned",
    "consistency",
    "list",
)


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _check_n(n: int) -> None:
    if int(n) < 1:
        raise ValueError(f"the number of sigmas must be >= 1, got {n}")


def _ramp(n: int) -> Tensor:
    """``n`` points from 0 to 1 in float64 (a single 0 when ``n`` is 1), after checking ``n``."""
    _check_n(n)
    return (
        torch.linspace(0, 1, n, dtype=torch.float64)
        if n > 1
        else torch.zeros(1, dtype=torch.float64)
    )


def karras(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, dtype: torch.dtype = torch.float64
) -> Tensor:
    """EDM eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    ramp = _ramp(n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho).to(dtype)


def logsnr(
    n: int, sigma_min: float, sigma_max: float, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Uniform in log-SNR = -2 log sigma (DPM-Solver's 'logSNR' steps)."""
    ramp = _ramp(n)
    log = math.log(sigma_max) + ramp * (math.log(sigma_min) - math.log(sigma_max))
    return _append_zero(log.exp()).to(dtype)


def time_uniform(schedule: Any, n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Uniform in the schedule's own time t, from t(sigma_max) down to t(sigma_min)."""
    _check_n(n)
    t_hi = float(schedule.t_of_sigma(torch.tensor(float(schedule.sigma_max), dtype=torch.float64)))
    t_lo = float(schedule.t_of_sigma(torch.tensor(float(schedule.sigma_min), dtype=torch.float64)))
    t = torch.linspace(t_hi, t_lo, n, dtype=torch.float64) if n > 1 else torch.tensor([t_hi])
    sig = torch.as_tensor(schedule.sigma(t), dtype=torch.float64)
    return _append_zero(sig).to(dtype)


def ddpm_respacing(
    grid: Tensor,
    n: int,
    spacing: str = "leading",
    steps_offset: int = 0,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """DDPM/DDIM timestep respacing over a discrete grid of ``T`` increasing sigmas.

    ``linspace``: round(linspace(0, T-1, n)); ``leading``: arange(n) * (T // n) + steps_offset
    (DDIM / Stable Diffusion); ``trailing``: round(arange(T, 0, -T/n)) - 1 (Lin et al. 2024, Table 2).
    """
    _check_n(n)
    T = len(grid)
    if n > T:
        raise ValueError(f"cannot take {n} steps on a discrete schedule with {T} steps")
    if spacing == "linspace":
        idx = torch.linspace(0, T - 1, n, dtype=torch.float64).round().long()
    elif spacing == "leading":
        idx = torch.arange(n) * (T // n) + int(steps_offset)
    elif spacing == "trailing":
        idx = torch.arange(float(T), 0, -T / n, dtype=torch.float64).round().long() - 1
    else:
        raise ValueError(f"unknown spacing {spacing!r}; valid: leading, linspace, trailing")
    idx = idx.clamp(0, T - 1).unique().flip(0)
    return _append_zero(torch.as_tensor(grid, dtype=torch.float64)[idx]).to(dtype)


def learned(n: int, sigmas: Any, dtype: torch.dtype = torch.float64) -> Tensor:
    """A fitted grid (``dl-fit-sigmas``) as a tensor, checked to have ``n`` positive sigmas + 0."""
    _check_n(n)
    if sigmas is None:
        raise ValueError(
            "discretization 'learned' needs a fitted grid (dl-fit-sigmas; sampler.sigmas_file=<file>)"
        )
    grid = torch.as_tensor(sigmas, dtype=torch.float64)
    if grid.dim() != 1 or len(grid) != n + 1:
        raise ValueError(f"the learned grid has {len(grid) - 1} steps; this budget needs {n}")
    return grid.to(dtype)


def consistency(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, dtype: torch.dtype = torch.float64
) -> Tensor:
    """The ``n`` largest sigmas of the (n + 1)-point EDM grid (eq. 5): sigma_max and n - 1 levels
    between, for multistep consistency sampling (Song et al. 2023, Alg. 1), which re-noises to each
    level and maps back; the grid's own sigma_min is dropped, where f(x; sigma_min) = x would
    spend an evaluation on nothing. ``list`` gives chosen levels instead (ECT's 2-step 80, 0.821)."""
    _check_n(n)
    return _append_zero(karras(n + 1, sigma_min, sigma_max, rho, dtype)[:n])


def given(n: int, sigmas: Any, dtype: torch.dtype = torch.float64) -> Tensor:
    """A chosen list of ``n`` decreasing positive sigmas (the final 0 may be left out)."""
    _check_n(n)
    if sigmas is None:
        raise ValueError("discretization 'list' needs the sigmas (sampler.sigmas=[80, 0.821])")
    grid = torch.as_tensor([float(s) for s in sigmas], dtype=torch.float64)
    if len(grid) and float(grid[-1]) != 0.0:
        grid = _append_zero(grid)
    if len(grid) - 1 != n:
        raise ValueError(
            f"the sigma list {grid[:-1].tolist()} has {len(grid) - 1} levels; this budget needs {n} "
            f"(set the NFE to {len(grid) - 1})"
        )
    return grid.to(dtype)


def snap_to_grid(sigmas: Tensor, grid: Tensor) -> Tensor:
    """Move every positive sigma to the nearest (in log sigma) sigma of a discrete grid, drop
    duplicates, keep the final 0. The result may have fewer steps than the input."""
    grid = torch.as_tensor(grid, dtype=torch.float64)
    pos = sigmas[sigmas > 0].to(torch.float64)
    idx = (pos.log()[:, None] - grid.log()[None, :]).abs().argmin(dim=1)
    return _append_zero(grid[idx.unique().flip(0)]).to(sigmas.dtype)


def get_sigmas(
    name: str,
    n: int,
    schedule: Any = None,
    *,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    dtype: torch.dtype = torch.float64,
    **kw: Any,
) -> Tensor:
    """A grid of ``n`` positive sigmas plus the final 0 by name (one of :data:`DISCRETIZATIONS`).

    ``sigma_min`` / ``sigma_max`` default to the schedule's; ``leading``/``linspace``/``trailing``
    need a discrete schedule; ``kw``: ``rho`` (karras, consistency), ``steps_offset`` (leading),
    ``sigmas`` (learned: a fitted grid of ``n`` positive sigmas and 0, see
    ``diffusion/grid_fit.py``; list: chosen sigmas).
    """
    if name not in DISCRETIZATIONS:
        raise ValueError(f"unknown discretization {name!r}; valid: {', '.join(DISCRETIZATIONS)}")
    if name == "learned":
        return learned(n, kw.get("sigmas"), dtype=dtype)
    if name == "list":
        return given(n, kw.get("sigmas"), dtype=dtype)
    if kw.get("sigmas") is not None:
        raise ValueError(f"a list of sigmas is read with discretization 'list', not {name!r}")
    kw.pop("sigmas", None)
    if name in ("leading", "linspace", "trailing"):
        if schedule is None or not getattr(schedule, "discrete", False):
            raise ValueError(f"discretization {name!r} needs a discrete schedule (e.g. ddpm)")
        return ddpm_respacing(schedule.grid, n, name, dtype=dtype, **kw)
    if name == "time_uniform":
        if schedule is None:
            raise ValueError("discretization 'time_uniform' needs a schedule")
        return time_uniform(schedule, n, dtype=dtype)
    lo = float(sigma_min if sigma_min is not None else schedule.sigma_min)
    hi = float(sigma_max if sigma_max is not None else schedule.sigma_max)
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {lo}, {hi}")
    if name == "karras":
        return karras(n, lo, hi, dtype=dtype, **kw)
    if name == "consistency":
        return consistency(n, lo, hi, dtype=dtype, **kw)
    return logsnr(n, lo, hi, dtype=dtype)
