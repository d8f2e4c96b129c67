"""Exponential moving averages of the denoiser weights.

``PlainEMA``: fixed decay with the usual warm-up min(decay, (1 + n) / (10 + n)).
``HalfLifeEMA``: EDM's half-life in thousands of images with a ramp-up (EDM training_loop.py,
beta = 0.5 ** (batch / max(halflife, rampup * images_seen))).
"""

from __future__ import annotations

import torch
from torch import nn

from diffusionlab.errors import ConfigError


class PlainEMA:
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


class HalfLifeEMA:
    """EDM's EMA: half-life ``halflife_kimg`` thousand images, ramped over ``rampup_ratio`` of them."""

    def __init__(self, halflife_kimg: float = 500.0, rampup_ratio: float | None = 0.05) -> None:
        if halflife_kimg <= 0:
            raise ConfigError(f"ema.halflife_kimg={halflife_kimg} must be > 0")
        self.halflife_kimg = halflife_kimg
        self.rampup_ratio = rampup_ratio

    def beta(self, step: int, batch_size: int) -> float:
        halflife = self.halflife_kimg * 1000.0
        if self.rampup_ratio is not None:
            halflife = min(halflife, step * batch_size * self.rampup_ratio)
        return 0.5 ** (batch_size / max(halflife, 1e-8))


EMASchedule = PlainEMA | HalfLifeEMA


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * model for parameters; buffers are copied."""
    ema_params = list(ema.parameters())
    model_params = list(model.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model_params], 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)
