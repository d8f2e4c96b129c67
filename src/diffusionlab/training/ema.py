"""Exponential moving averages of the denoiser weights.

``PlainEMA``: fixed decay with the usual warm-up min(decay, (1 + n) / (10 + n)).
``HalfLifeEMA``: EDM's half-life in thousands of images with a ramp-up (EDM training_loop.py,
beta = 0.5 ** (batch / max(halflife, warmup_ratio * images_seen))).
``PowerEMA``: EDM2's power-function EMA, several profiles tracked at once and saved as snapshots
for post-hoc reconstruction (training/ema_power.py, training/ema_snapshots.py).

A schedule gives ``betas(step, batch_size)``, one decay per tracked profile (``num_profiles``);
the first profile is the module's sampling EMA.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusionlab.errors import ConfigError
from diffusionlab.training.ema_power import power_beta, sigma_rel_to_gamma


class _OneProfile:
    """A schedule that tracks a single EMA profile."""

    num_profiles = 1

    def beta(self, step: int, batch_size: int) -> float:
        raise NotImplementedError

    def betas(self, step: int, batch_size: int) -> list[float]:
        return [self.beta(step, batch_size)]


class PlainEMA(_OneProfile):
    """beta_n = min(decay, (1 + n) / (10 + n)) when ``warmup``, else ``decay``."""

    def __init__(self, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"ema.decay={decay} must be in [0, 1)")
        self.decay = decay
        self.warmup = warmup

    def beta(self, step: int, batch_size: int) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + step) / (10 + step))


class HalfLifeEMA(_OneProfile):
    """EDM's EMA: half-life ``halflife_kimg`` thousand images, warmed up over ``warmup_ratio`` of
    the images seen (EDM's ``ema_rampup_ratio``; ``rampup_ratio``, its name in checkpoints written
    before warm-up was spelled one way, is read as ``warmup_ratio``)."""

    def __init__(
        self,
        halflife_kimg: float = 500.0,
        warmup_ratio: float | None = 0.05,
        rampup_ratio: float | None = None,
    ) -> None:
        if halflife_kimg <= 0:
            raise ConfigError(f"ema.halflife_kimg={halflife_kimg} must be > 0")
        self.halflife_kimg = halflife_kimg
        self.warmup_ratio = warmup_ratio if rampup_ratio is None else rampup_ratio

    def beta(self, step: int, batch_size: int) -> float:
        halflife = self.halflife_kimg * 1000.0
        if self.warmup_ratio is not None:
            halflife = min(halflife, step * batch_size * self.warmup_ratio)
        return 0.5 ** (batch_size / max(halflife, 1e-8))


class PowerEMA:
    """EDM2's power-function EMA: one profile per ``sigma_rels`` entry, beta_t = (1 - 1/t)^(gamma+1)
    with t in optimizer steps (EDM2 eq. 5). Every ``snapshot_every`` steps (0 = never) each profile
    is saved to ``snapshot_dir`` for ``dl-reconstruct-ema``."""

    def __init__(
        self,
        sigma_rels: list[float] = (0.05, 0.10),
        snapshot_every: int = 0,
        snapshot_dir: str | None = None,
    ) -> None:
        sigma_rels = [float(s) for s in sigma_rels]
        if not sigma_rels:
            raise ConfigError("ema.sigma_rels is empty: give at least one (EDM2: [0.05, 0.10])")
        if len(set(sigma_rels)) != len(sigma_rels):
            raise ConfigError(f"ema.sigma_rels={sigma_rels} repeats a value")
        self.sigma_rels = sigma_rels
        self.gammas = [sigma_rel_to_gamma(s, "ema.sigma_rels") for s in sigma_rels]
        if int(snapshot_every) != snapshot_every or snapshot_every < 0:
            raise ConfigError(f"ema.snapshot_every={snapshot_every!r} must be an integer >= 0")
        if snapshot_every and not snapshot_dir:
            raise ConfigError("ema.snapshot_every > 0 needs ema.snapshot_dir")
        self.snapshot_every = int(snapshot_every)
        self.snapshot_dir = snapshot_dir

    @property
    def num_profiles(self) -> int:
        return len(self.sigma_rels)

    def betas(self, step: int, batch_size: int) -> list[float]:
        return [power_beta(gamma, step) for gamma in self.gammas]

    def snapshot_due(self, step: int) -> bool:
        return self.snapshot_every > 0 and step % self.snapshot_every == 0


EMASchedule = PlainEMA | HalfLifeEMA | PowerEMA


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * model for parameters; buffers are copied."""
    ema_params = list(ema.parameters())
    model_params = list(model.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model_params], 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)
