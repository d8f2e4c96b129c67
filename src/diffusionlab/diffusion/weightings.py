"""Loss weightings lambda(sigma) in D-space: loss = lambda(sigma) * mean_dims (D - x0)^2.

With SNR = 1 / sigma^2, an eps-MSE is SNR * ||D - x0||^2 and a parameterization's own MSE on F is
||D - x0||^2 / c_out^2, so every weighting in the literature is one function of sigma here.
Weightings are ``nn.Module``s so EDM2's learned uncertainty head trains with the loss.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from diffusionlab.diffusion.parameterizations import EDMParam, Parameterization
from diffusionlab.diffusion.schedules import _check


class Weighting(nn.Module, ABC):
    """Base class: ``forward(mse, sigma, parameterization) = lam(sigma) * mse`` per sample."""

    @abstractmethod
    def lam(self, sigma: Tensor, parameterization: Parameterization) -> Tensor:
        """lambda(sigma) in D-space."""

    def forward(self, mse: Tensor, sigma: Tensor, parameterization: Parameterization) -> Tensor:
        return self.lam(sigma, parameterization) * mse


class SimpleWeighting(Weighting):
    """The parameterization's natural target: lambda = 1 / c_out^2 (eps: 1/sigma^2 = DDPM's
    L_simple; v: 1 + SNR; x0: 1; flow: ((1 + sigma) / sigma)^2; EDM: EDM's lambda)."""

    def lam(self, sigma: Tensor, parameterization: Parameterization) -> Tensor:
        return parameterization.loss_weight(sigma)


class SNRWeighting(Weighting):
    """lambda = SNR = 1 / sigma^2: the eps-MSE for any parameterization (EDM's VP/VE losses)."""

    def lam(self, sigma: Tensor, parameterization: Parameterization) -> Tensor:
        return sigma**-2


class MinSNRWeighting(Weighting):
    """Min-SNR-gamma (Hang et al. 2023, sec. 3.4): lambda = min(SNR, gamma).

    Equals their x0-loss weight, eps-loss weight min(SNR, gamma) / SNR and v-loss weight
    min(SNR, gamma) / (SNR + 1) once converted to D-space.
    """

    def __init__(self, gamma: float = 5.0) -> None:
        super().__init__()
        _check(gamma > 0, "gamma", gamma, "must be > 0")
        self.gamma = float(gamma)

    def lam(self, sigma: Tensor, parameterization: Parameterization) -> Tensor:
        return torch.clamp(sigma**-2, max=self.gamma)


class SoftMinSNRWeighting(Weighting):
    """Soft-min-SNR (Crowson et al. 2024, HDiT): lambda = 1 / (1/SNR + 1/gamma)
    = SNR gamma / (SNR + gamma), a smooth min(SNR, gamma). k-diffusion's ``soft-min-snr`` is this
    with gamma = 1 / sigma_data^2 (its F-space weight times 1 / c_out^2)."""

    def __init__(self, gamma: float = 5.0) -> None:
        super().__init__()
        _check(gamma > 0, "gamma", gamma, "must be > 0")
        self.gamma = float(gamma)

    def lam(self, sigma: Tensor, parameterization: Parameterization) -> Tensor:
        return 1 / (sigma**2 + 1 / self.gamma)


class EDMWeighting(Weighting):
    """EDM eq. 8 / Table 1: lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.

    ``sigma_data=None`` takes the parameterization's (``EDMParam``) or 0.5.
    """

    def __init__(self, sigma_data: float | None = None) -> None:
        super().__init__()
        _check(sigma_data is None or sigma_data > 0, "sigma_data", sigma_data, "must be > 0")
        self.sigma_data = sigma_data

    def lam(self, sigma: Tensor, parameterization: Parameterization) -> Tensor:
        sd = self.sigma_data
        if sd is None:
            sd = parameterization.sigma_data if isinstance(parameterization, EDMParam) else 0.5
        return (sigma**2 + sd**2) / (sigma * sd) ** 2


class UncertaintyWeighting(Weighting):
    """EDM2's learned uncertainty (Karras et al. 2024; Kendall & Gal 2018): lam mse / e^u + u.

    u is a linear head on Fourier features of ln(sigma)/4 (EDM2's MPFourier + logvar layer),
    zero-initialised so training starts at the base weighting. EDM2 sums over pixels; with the
    mean over dims used here the optimum u(sigma) = ln E[lam mse | sigma] is the same.
    """

    def __init__(self, base: Weighting | None = None, channels: int = 128, seed: int = 0) -> None:
        super().__init__()
        _check(channels > 0, "channels", channels, "must be > 0")
        self.base = EDMWeighting() if base is None else base
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=g))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def logvar(self, sigma: Tensor) -> Tensor:
        """u(sigma), shape of ``sigma``."""
        c = (sigma.float().log() / 4).unsqueeze(-1)
        features = math.sqrt(2) * torch.cos(c * self.freqs + self.phases)
        return self.linear(features).squeeze(-1)

    def lam(self, sigma: Tensor, parameterization: Parameterization) -> Tensor:
        return self.base.lam(sigma, parameterization)

    def forward(self, mse: Tensor, sigma: Tensor, parameterization: Parameterization) -> Tensor:
        u = self.logvar(sigma)
        return self.lam(sigma, parameterization) * mse / u.exp() + u


WEIGHTINGS: dict[str, type[Weighting]] = {
    "simple": SimpleWeighting,
    "snr": SNRWeighting,
    "min_snr": MinSNRWeighting,
    "soft_min_snr": SoftMinSNRWeighting,
    "edm": EDMWeighting,
    "uncertainty": UncertaintyWeighting,
}


def get_weighting(name: str, **options: object) -> Weighting:
    """Build a weighting by name."""
    _check(name in WEIGHTINGS, "weighting", name, f"unknown; valid names: {sorted(WEIGHTINGS)}")
    return WEIGHTINGS[name](**options)
