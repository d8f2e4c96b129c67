"""Pieces NVlabs/edm preconditionings need beyond the project's own schedules and
parameterizations: a sampling range inside a schedule, and EDM's VE preconditioning."""

from __future__ import annotations

import torch
from torch import Tensor

from diffusionlab.diffusion.parameterizations import EpsParam, Parameterization, _unwrap
from diffusionlab.diffusion.schedules import Schedule, VPSchedule, _check


class SigmaRange(Schedule):
    """``base`` restricted to ``[sigma_min, sigma_max]`` (intersected with the base's own range).

    EDM's ``generate.py`` samples every preconditioning on ``[max(0.002, net.sigma_min),
    min(80, net.sigma_max)]``; VP's own range reaches sigma(1) = 152, so a VP pickle's schedule is
    ``SigmaRange(VPSchedule(...), 0.002, 80)``: the same sigma(t), s(t) and t(sigma) as the base
    (the network's c_noise is unchanged), only the ends of the samplers' grids move.
    """

    def __init__(self, base: Schedule, sigma_min: float, sigma_max: float) -> None:
        _check(isinstance(base, Schedule), "base", base, "must be a schedule")
        self.base = base
        self.scale_kind, self.discrete = base.scale_kind, base.discrete
        self._lo = max(float(sigma_min), base.sigma_min)
        self._hi = min(float(sigma_max), base.sigma_max)
        _check(self._lo < self._hi, "sigma_min", sigma_min, f"must be < sigma_max={sigma_max}")
        as64 = torch.tensor([self._lo, self._hi], dtype=torch.float64)
        self.t_min, self.t_max = (float(t) for t in base._t_of_sigma(as64))

    def _sigma(self, t: Tensor) -> Tensor:
        return self.base._sigma(t)

    def _sigma_deriv(self, t: Tensor) -> Tensor:
        return self.base._sigma_deriv(t)

    def _t_of_sigma(self, sigma: Tensor) -> Tensor:
        return self.base._t_of_sigma(sigma)

    @property
    def sigma_min(self) -> float:
        return self._lo

    @property
    def sigma_max(self) -> float:
        return self._hi


class VEPrecond(Parameterization):
    """EDM Table 1, VE column (NVlabs/edm ``VEPrecond``): c_skip 1, c_out sigma, c_in 1,
    c_noise ln(sigma / 2)."""

    def __init__(self, schedule: Schedule) -> None:
        super().__init__(schedule, c_noise="log")

    def c_noise(self, sigma: Tensor) -> Tensor:
        return (0.5 * sigma).log()

    def _coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma)

    def __repr__(self) -> str:
        return "VEPrecond(c_noise='ln(sigma/2)')"


class VPPrecond(EpsParam):
    """EDM Table 1, VP column (NVlabs/edm ``VPPrecond``): the eps parameterization with
    c_noise = (M - 1) t(sigma), computed in float32 by EDM's formula
    t = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d, as its network saw it
    (c_noise reaches 999, where float32 rounding moves the sinusoidal embedding by 1e-4)."""

    def __init__(self, schedule: Schedule, M: int = 1000) -> None:
        base = _unwrap(schedule)
        _check(isinstance(base, VPSchedule), "schedule", schedule, "VPPrecond needs a VP schedule")
        super().__init__(schedule, c_noise="t", t_scale=M - 1)
        self.beta_min, self.beta_d, self.M = base.beta_min, base.beta_d, int(M)

    def c_noise(self, sigma: Tensor) -> Tensor:
        s = sigma.float()
        t = (self.beta_min**2 + 2 * self.beta_d * (1 + s**2).log()).sqrt() - self.beta_min
        return (self.M - 1) * (t / self.beta_d)

    def __repr__(self) -> str:
        return f"VPPrecond(M={self.M})"
