"""Training noise-level distributions p_train(sigma): each draws a float32 ``[B]`` of sigmas.

``importance_weight(sigma, schedule)`` is the factor the loss multiplies in so that a proposal
distribution still optimises a target objective (1 everywhere but ``UniformLogSNR(reweight=True)``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from diffusionlab.diffusion.batched_rng import BatchedGenerator
from diffusionlab.diffusion.noise import Generator, StackedRandomGenerator
from diffusionlab.diffusion.schedules import Schedule, _check


def _draw(kind: str, n: int, generator: Generator, device: torch.device | str | None) -> Tensor:
    """``n`` float64 uniform (``kind="rand"``) or normal (``"randn"``) numbers on ``device``;
    a per-sample generator gives row ``i`` its own number."""
    fn = torch.rand if kind == "rand" else torch.randn
    if isinstance(generator, BatchedGenerator):
        _check(len(generator) == n, "generator", len(generator), f"need {n} per-sample keys")
        draw = generator.rand if kind == "rand" else generator.randn
        out = draw((n,), dtype=torch.float64)
    elif isinstance(generator, StackedRandomGenerator):
        _check(len(generator) == n, "generator", len(generator), f"need {n} per-sample seeds")
        out = torch.cat(
            [fn(1, generator=g, device=g.device, dtype=torch.float64) for g in generator.generators]
        )
    elif generator is not None:
        out = fn(n, generator=generator, device=generator.device, dtype=torch.float64)
    else:
        out = fn(n, device=device, dtype=torch.float64)
    return out.to(device)


class NoiseDistribution(ABC):
    """Base class; subclasses define ``sample``."""

    @abstractmethod
    def sample(
        self,
        n: int,
        schedule: Schedule,
        generator: Generator = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """``n`` sigmas, float32, on ``device``."""

    def importance_weight(self, sigma: Tensor, schedule: Schedule) -> Tensor:
        """p_target(sigma) / p_train(sigma); 1 when the distribution is itself the target."""
        return torch.ones_like(sigma)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in vars(self).items())})"


class UniformT(NoiseDistribution):
    """t ~ U[t_min, t_max] of the schedule (DDPM eq. 14, VP-SDE); a discrete schedule draws the
    integer step uniformly from 0..T-1 unless ``discrete=False``. ``None`` follows the schedule."""

    def __init__(self, discrete: bool | None = None) -> None:
        self.discrete = discrete

    def sample(
        self,
        n: int,
        schedule: Schedule,
        generator: Generator = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        discrete = schedule.discrete if self.discrete is None else self.discrete
        _check(
            not discrete or schedule.discrete,
            "discrete",
            self.discrete,
            f"needs a discrete schedule, got {schedule}",
        )
        u = _draw("rand", n, generator, device)
        if discrete:
            t = (u * (schedule.t_max + 1)).floor().clamp(max=schedule.t_max)
        else:
            t = schedule.t_min + u * (schedule.t_max - schedule.t_min)
        return schedule.sigma(t).float()


class LogNormal(NoiseDistribution):
    """ln sigma ~ N(P_mean, P_std^2) (EDM sec. 5, Table 1: P_mean = -1.2, P_std = 1.2)."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2) -> None:
        _check(p_std > 0, "p_std", p_std, "must be > 0")
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    def sample(
        self,
        n: int,
        schedule: Schedule,
        generator: Generator = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        return torch.exp(self.p_mean + self.p_std * _draw("randn", n, generator, device)).float()


class LogitNormal(NoiseDistribution):
    """t = t_min + sigmoid(m + s z) (t_max - t_min), z ~ N(0, 1) (SD3, Esser et al. 2024 eq. 19)."""

    def __init__(self, loc: float = 0.0, scale: float = 1.0) -> None:
        _check(scale > 0, "scale", scale, "must be > 0")
        self.loc, self.scale = float(loc), float(scale)

    def sample(
        self,
        n: int,
        schedule: Schedule,
        generator: Generator = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        u = torch.sigmoid(self.loc + self.scale * _draw("randn", n, generator, device))
        return schedule.sigma(schedule.t_min + u * (schedule.t_max - schedule.t_min)).float()


class UniformLogSNR(NoiseDistribution):
    """log-SNR = -2 ln sigma uniform on the schedule's [sigma_min, sigma_max] (EDM's VE training).

    Density p(sigma) = 1 / (sigma ln(sigma_max / sigma_min)). With ``reweight=True`` the loss is
    importance-weighted by p_t(sigma) / p(sigma), where p_t is the density of sigma(t) for t uniform
    on [t_min, t_max] (continuous t, also on discrete schedules), so its expectation is the
    uniform-t objective.
    """

    def __init__(self, reweight: bool = False) -> None:
        self.reweight = reweight

    def sample(
        self,
        n: int,
        schedule: Schedule,
        generator: Generator = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        lo, hi = math.log(schedule.sigma_min), math.log(schedule.sigma_max)
        return torch.exp(lo + (hi - lo) * _draw("rand", n, generator, device)).float()

    def log_prob(self, sigma: Tensor, schedule: Schedule) -> Tensor:
        """ln p(sigma) on the support."""
        return -sigma.log() - math.log(math.log(schedule.sigma_max / schedule.sigma_min))

    def importance_weight(self, sigma: Tensor, schedule: Schedule) -> Tensor:
        if not self.reweight:
            return torch.ones_like(sigma)
        dsigma_dt = schedule.sigma_deriv(schedule.t_of_sigma(sigma)).abs()
        log_p_t = -torch.log(dsigma_dt * (schedule.t_max - schedule.t_min))
        return torch.exp(log_p_t - self.log_prob(sigma, schedule))


NOISE_DISTRIBUTIONS: dict[str, type[NoiseDistribution]] = {
    "uniform_t": UniformT,
    "log_normal": LogNormal,
    "logit_normal": LogitNormal,
    "uniform_log_snr": UniformLogSNR,
}


def get_noise_distribution(name: str, **options: object) -> NoiseDistribution:
    """Build a training noise distribution by name."""
    _check(
        name in NOISE_DISTRIBUTIONS,
        "noise",
        name,
        f"unknown; valid names: {sorted(NOISE_DISTRIBUTIONS)}",
    )
    return NOISE_DISTRIBUTIONS[name](**options)
