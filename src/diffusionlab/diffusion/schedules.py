"""Noise schedules in EDM form: ``x = s(t) (x0 + sigma(t) n)`` (EDM eq. 7, Table 1).

Every schedule maps a time ``t`` in ``[t_min, t_max]`` to ``sigma(t)`` and ``s(t)``. The scale is a
function of sigma fixed by the schedule's family (``scale_kind``):

- ``"vp"``:   s = 1 / sqrt(1 + sigma^2)   (DDPM, VP-SDE, iDDPM cosine)
- ``"ve"``:   s = 1                       (VE-SDE, EDM)
- ``"flow"``: s = 1 / (1 + sigma) = 1 - t (rectified flow, x_t = (1 - t) x0 + t n)

Discrete schedules (DDPM, iDDPM) use the step index as time: ``t`` in ``[0, T-1]`` with log-sigma
linear between grid points, so ``t_of_sigma`` is the fractional index and ``sigma_to_index`` the
nearest integer index in log-sigma. All maths runs in float64 and returns the input's dtype.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from diffusionlab.errors import ConfigError

TensorLike = Tensor | float


def _check(ok: bool, key: str, value: object, why: str) -> None:
    """Raise one ``ConfigError`` (a ``ValueError``) naming the key and value."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


def _as64(x: TensorLike) -> tuple[Tensor, torch.dtype]:
    """``x`` as a float64 tensor and the dtype to return (float32 for Python numbers)."""
    x = torch.as_tensor(x)
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    return x.to(torch.float64), dtype


def scale_of_sigma(kind: str, sigma: Tensor) -> Tensor:
    """s as a function of sigma for a schedule family (see module docstring)."""
    if kind == "vp":
        return torch.rsqrt(1 + sigma**2)
    if kind == "flow":
        return 1 / (1 + sigma)
    return torch.ones_like(sigma)


def scale_of_sigma_deriv(kind: str, sigma: Tensor) -> Tensor:
    """ds/dsigma for a schedule family."""
    if kind == "vp":
        return -sigma * (1 + sigma**2) ** -1.5
    if kind == "flow":
        return -1 / (1 + sigma) ** 2
    return torch.zeros_like(sigma)


class Schedule(ABC):
    """Base class: subclasses define ``_sigma``, ``_t_of_sigma`` and ``_sigma_deriv`` on float64."""

    scale_kind: str = "ve"
    discrete: bool = False
    t_min: float
    t_max: float

    @abstractmethod
    def _sigma(self, t: Tensor) -> Tensor:
        """float64 in, float64 out."""

    @abstractmethod
    def _t_of_sigma(self, sigma: Tensor) -> Tensor:
        """float64 in, float64 out."""

    @abstractmethod
    def _sigma_deriv(self, t: Tensor) -> Tensor:
        """float64 in, float64 out."""

    def _validate_range(self) -> None:
        _check(self.t_min < self.t_max, "t_min", self.t_min, f"must be < t_max={self.t_max}")
        _check(
            0 < self.sigma_min < self.sigma_max < math.inf,
            "sigma_min",
            self.sigma_min,
            f"need 0 < sigma_min < sigma_max={self.sigma_max} < inf",
        )

    def _apply(self, fn: Callable[[Tensor], Tensor], x: TensorLike) -> Tensor:
        x64, dtype = _as64(x)
        return fn(x64).to(dtype)

    def sigma(self, t: TensorLike) -> Tensor:
        """Noise level sigma(t)."""
        return self._apply(self._sigma, t)

    def t_of_sigma(self, sigma: TensorLike) -> Tensor:
        """Inverse of ``sigma(t)``."""
        return self._apply(self._t_of_sigma, sigma)

    def sigma_deriv(self, t: TensorLike) -> Tensor:
        """d sigma / dt."""
        return self._apply(self._sigma_deriv, t)

    def scale(self, t: TensorLike) -> Tensor:
        """s(t) (EDM Table 1)."""
        return self._apply(lambda t: scale_of_sigma(self.scale_kind, self._sigma(t)), t)

    def scale_deriv(self, t: TensorLike) -> Tensor:
        """ds/dt = ds/dsigma * dsigma/dt."""

        def fn(t: Tensor) -> Tensor:
            return scale_of_sigma_deriv(self.scale_kind, self._sigma(t)) * self._sigma_deriv(t)

        return self._apply(fn, t)

    @property
    def sigma_min(self) -> float:
        return float(self._sigma(torch.tensor(self.t_min, dtype=torch.float64)))

    @property
    def sigma_max(self) -> float:
        return float(self._sigma(torch.tensor(self.t_max, dtype=torch.float64)))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(sigma_min={self.sigma_min:.4g}, sigma_max={self.sigma_max:.4g})"
        )


class DiscreteSchedule(Schedule):
    """A grid of ``T`` increasing sigmas; ``t`` is the (fractional) step index in ``[0, T-1]``."""

    discrete = True
    scale_kind = "vp"

    def __init__(self, sigmas: Tensor) -> None:
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        _check(sigmas.ndim == 1 and len(sigmas) >= 2, "sigmas", tuple(sigmas.shape), "need >= 2")
        _check(bool((sigmas > 0).all()), "sigmas", float(sigmas.min()), "must be positive")
        _check(bool((sigmas.diff() > 0).all()), "sigmas", "grid", "must be strictly increasing")
        self._log_grid = sigmas.log()
        self.t_min, self.t_max = 0.0, float(len(sigmas) - 1)
        self.num_steps = len(sigmas)

    @property
    def grid(self) -> Tensor:
        """Increasing sigmas (float32), ``grid[i]`` = sigma at integer step ``i``."""
        return self._log_grid.exp().float()

    def _segment(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        log_grid = self._log_grid.to(t.device)
        t = t.clamp(self.t_min, self.t_max)
        lo = t.floor().long().clamp(max=self.num_steps - 2)
        return log_grid[lo], log_grid[lo + 1], t - lo

    def _sigma(self, t: Tensor) -> Tensor:
        a, b, w = self._segment(t)
        return torch.exp(a + w * (b - a))

    def _sigma_deriv(self, t: Tensor) -> Tensor:
        a, b, _ = self._segment(t)
        return self._sigma(t) * (b - a)

    def _t_of_sigma(self, sigma: Tensor) -> Tensor:
        log_grid = self._log_grid.to(sigma.device)
        log_sigma = sigma.log()
        hi = torch.searchsorted(log_grid, log_sigma.contiguous()).clamp(1, self.num_steps - 1)
        a, b = log_grid[hi - 1], log_grid[hi]
        return ((hi - 1) + (log_sigma - a) / (b - a)).clamp(self.t_min, self.t_max)

    def sigma_to_index(self, sigma: TensorLike) -> Tensor:
        """Nearest grid index in log-sigma (long); ``t_of_sigma`` gives the fractional index."""
        return self.t_of_sigma(torch.as_tensor(sigma, dtype=torch.float64)).round().long()


def _vp_sigmas_from_alpha_bar(alpha_bar: Tensor) -> Tensor:
    """sigma_t = sqrt(1 / alphabar_t - 1) (EDM Table 1, VP)."""
    return torch.sqrt(1 / alpha_bar - 1)


class DDPMSchedule(DiscreteSchedule):
    """DDPM linear betas (Ho et al. 2020 sec. 4): alphabar_t = prod_{i<=t} (1 - beta_i)."""

    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        _check(num_steps >= 2, "num_steps", num_steps, "must be >= 2")
        _check(
            0 < beta_start < beta_end < 1,
            "beta_start",
            beta_start,
            f"need 0 < beta_start < beta_end={beta_end} < 1",
        )
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        super().__init__(_vp_sigmas_from_alpha_bar(torch.cumprod(1 - betas, 0)))


class CosineSchedule(DiscreteSchedule):
    """iDDPM cosine (Nichol & Dhariwal 2021 eq. 17) with betas clipped at ``max_beta``."""

    def __init__(self, num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        _check(num_steps >= 2, "num_steps", num_steps, "must be >= 2")
        _check(s > 0, "s", s, "must be > 0")
        _check(0 < max_beta < 1, "max_beta", max_beta, "must be in (0, 1)")
        f = cosine_alpha_bar(torch.arange(num_steps + 1, dtype=torch.float64) / num_steps, s)
        betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
        super().__init__(_vp_sigmas_from_alpha_bar(torch.cumprod(1 - betas, 0)))


def cosine_alpha_bar(t: Tensor, s: float = 0.008) -> Tensor:
    """alphabar(t) = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) * pi / 2) (iDDPM eq. 17)."""
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return f / math.cos(s / (1 + s) * math.pi / 2) ** 2


class ContinuousCosineSchedule(Schedule):
    """Continuous-time iDDPM cosine, sigma(t) = sqrt(1 / alphabar(t) - 1) on ``[t_min, t_max]``."""

    scale_kind = "vp"

    def __init__(self, s: float = 0.008, t_min: float = 1e-4, t_max: float = 0.999) -> None:
        _check(s > 0, "s", s, "must be > 0")
        _check(t_min > 0, "t_min", t_min, "must be > 0")
        _check(t_max < 1, "t_max", t_max, "must be < 1 (sigma is infinite at t = 1)")
        self.s, self.t_min, self.t_max = s, t_min, t_max
        self._validate_range()

    def _angle(self, t: Tensor) -> Tensor:
        return (t + self.s) / (1 + self.s) * math.pi / 2

    def _sigma(self, t: Tensor) -> Tensor:
        return _vp_sigmas_from_alpha_bar(cosine_alpha_bar(t, self.s))

    def _sigma_deriv(self, t: Tensor) -> Tensor:
        # sigma^2 = c / cos^2(a) - 1  =>  sigma' = c tan(a) / cos^2(a) * a' / sigma
        c = math.cos(self.s / (1 + self.s) * math.pi / 2) ** 2
        a = self._angle(t)
        return c * torch.tan(a) / torch.cos(a) ** 2 * (math.pi / 2 / (1 + self.s)) / self._sigma(t)

    def _t_of_sigma(self, sigma: Tensor) -> Tensor:
        c = math.cos(self.s / (1 + self.s) * math.pi / 2) ** 2
        a = torch.acos(torch.sqrt(c / (1 + sigma**2)))
        return a * 2 / math.pi * (1 + self.s) - self.s


class VPSchedule(Schedule):
    """Continuous VP-SDE with linear beta (Song et al. 2021; EDM Table 1, eq. 5 with beta_d, beta_min)."""

    scale_kind = "vp"

    def __init__(self, beta_min: float = 0.1, beta_d: float = 19.9, epsilon_t: float = 1e-5):
        _check(beta_min >= 0, "beta_min", beta_min, "must be >= 0")
        _check(beta_d > 0, "beta_d", beta_d, "must be > 0")
        _check(0 < epsilon_t < 1, "epsilon_t", epsilon_t, "must be in (0, 1)")
        self.beta_min, self.beta_d = beta_min, beta_d
        self.t_min, self.t_max = epsilon_t, 1.0
        self._validate_range()

    def _exponent(self, t: Tensor) -> Tensor:
        return 0.5 * self.beta_d * t**2 + self.beta_min * t

    def _sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(torch.expm1(self._exponent(t)))

    def _sigma_deriv(self, t: Tensor) -> Tensor:
        return (
            (self.beta_d * t + self.beta_min) * torch.exp(self._exponent(t)) / (2 * self._sigma(t))
        )

    def _t_of_sigma(self, sigma: Tensor) -> Tensor:
        root = torch.sqrt(self.beta_min**2 + 2 * self.beta_d * torch.log1p(sigma**2))
        return (root - self.beta_min) / self.beta_d


class VESchedule(Schedule):
    """VE-SDE. Default EDM Table 1: sigma(t) = sqrt(t), t in [sigma_min^2, sigma_max^2].

    ``geometric=True`` gives Song et al.'s form sigma(t) = sigma_min (sigma_max / sigma_min)^t,
    t in [0, 1]. Both share the same sigma range; EDM trains VE with log-uniform sigma.
    """

    scale_kind = "ve"

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0, geometric: bool = False):
        _check(sigma_min > 0, "sigma_min", sigma_min, "must be > 0")
        _check(sigma_min < sigma_max, "sigma_min", sigma_min, f"must be < sigma_max={sigma_max}")
        self.geometric, self._lo, self._hi = geometric, sigma_min, sigma_max
        self.t_min, self.t_max = (0.0, 1.0) if geometric else (sigma_min**2, sigma_max**2)
        self._validate_range()

    def _sigma(self, t: Tensor) -> Tensor:
        if self.geometric:
            return self._lo * (self._hi / self._lo) ** t
        return torch.sqrt(t)

    def _sigma_deriv(self, t: Tensor) -> Tensor:
        if self.geometric:
            return self._sigma(t) * math.log(self._hi / self._lo)
        return 0.5 / torch.sqrt(t)

    def _t_of_sigma(self, sigma: Tensor) -> Tensor:
        if self.geometric:
            return torch.log(sigma / self._lo) / math.log(self._hi / self._lo)
        return sigma**2


class EDMSchedule(Schedule):
    """EDM (Karras et al. 2022, Table 1): sigma(t) = t, s(t) = 1, sigma in [0.002, 80]."""

    scale_kind = "ve"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        _check(sigma_min > 0, "sigma_min", sigma_min, "must be > 0")
        _check(sigma_min < sigma_max, "sigma_min", sigma_min, f"must be < sigma_max={sigma_max}")
        self.t_min, self.t_max = sigma_min, sigma_max
        self._validate_range()

    def _sigma(self, t: Tensor) -> Tensor:
        return t.clone()

    def _sigma_deriv(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def _t_of_sigma(self, sigma: Tensor) -> Tensor:
        return sigma.clone()


class FlowSchedule(Schedule):
    """Rectified flow (Liu et al. 2022): x_t = (1 - t) x0 + t n, so s = 1 - t, sigma = t / (1 - t).

    t is kept inside (0, 1) (default [1e-3, 1 - 1e-3], sigma ~ [1e-3, 999]) so sigma stays finite.
    """

    scale_kind = "flow"

    def __init__(self, t_min: float = 1e-3, t_max: float = 1 - 1e-3) -> None:
        _check(t_min > 0, "t_min", t_min, "must be > 0")
        _check(t_max < 1, "t_max", t_max, "must be < 1 (sigma is infinite at t = 1)")
        self.t_min, self.t_max = t_min, t_max
        self._validate_range()

    def _sigma(self, t: Tensor) -> Tensor:
        return t / (1 - t)

    def _sigma_deriv(self, t: Tensor) -> Tensor:
        return 1 / (1 - t) ** 2

    def _t_of_sigma(self, sigma: Tensor) -> Tensor:
        return sigma / (1 + sigma)


class ShiftedSchedule(Schedule):
    """Resolution shift of any schedule: sigma'(t) = shift * sigma(t), i.e. logSNR - 2 log shift.

    Same family of s(sigma) as the base. For flow this is SD3's t' = shift t / (1 + (shift - 1) t)
    (Esser et al. 2024 eq. 23); simple diffusion (Hoogeboom et al. 2023) uses shift = res / base_res.
    Give ``shift`` or both ``resolution`` and ``base_resolution``.
    """

    def __init__(
        self,
        base: Schedule | str = "flow",
        shift: float | None = None,
        resolution: int | None = None,
        base_resolution: int | None = None,
    ) -> None:
        if shift is None:
            _check(
                resolution is not None and base_resolution is not None,
                "shift",
                shift,
                "give shift or both resolution and base_resolution",
            )
            _check(resolution > 0, "resolution", resolution, "must be > 0")
            _check(base_resolution > 0, "base_resolution", base_resolution, "must be > 0")
            shift = resolution / base_resolution
        _check(shift > 0, "shift", shift, "must be > 0")
        self.base = get_schedule(base) if isinstance(base, str) else base
        self.shift = float(shift)
        self.scale_kind, self.discrete = self.base.scale_kind, self.base.discrete
        self.t_min, self.t_max = self.base.t_min, self.base.t_max

    def _sigma(self, t: Tensor) -> Tensor:
        return self.shift * self.base._sigma(t)

    def _sigma_deriv(self, t: Tensor) -> Tensor:
        return self.shift * self.base._sigma_deriv(t)

    def _t_of_sigma(self, sigma: Tensor) -> Tensor:
        return self.base._t_of_sigma(sigma / self.shift)

    @property
    def grid(self) -> Tensor:
        """The base grid times ``shift`` (discrete bases only)."""
        return self.base.grid * self.shift

    def sigma_to_index(self, sigma: TensorLike) -> Tensor:
        """Nearest step of the shifted grid (discrete bases only)."""
        return self.base.sigma_to_index(torch.as_tensor(sigma, dtype=torch.float64) / self.shift)


SCHEDULES: dict[str, type[Schedule]] = {
    "ddpm": DDPMSchedule,
    "vp": VPSchedule,
    "cosine": CosineSchedule,
    "cosine_continuous": ContinuousCosineSchedule,
    "ve": VESchedule,
    "edm": EDMSchedule,
    "flow": FlowSchedule,
    "shifted": ShiftedSchedule,
}


def get_schedule(name: str, shift: float | None = None, **kwargs: object) -> Schedule:
    """Build a schedule by name; ``shift`` wraps it in ``ShiftedSchedule``.

    ``get_schedule("shifted", base="flow", shift=3.0)`` and ``get_schedule("flow", shift=3.0)``
    are the same schedule.
    """
    _check(name in SCHEDULES, "schedule", name, f"unknown; valid names: {sorted(SCHEDULES)}")
    if name == "shifted":
        return ShiftedSchedule(shift=shift, **kwargs)
    schedule = SCHEDULES[name](**kwargs)
    return schedule if shift is None else ShiftedSchedule(schedule, shift=shift)
