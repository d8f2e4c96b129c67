"""iDDPM (Nichol & Dhariwal 2021) in sigma-space: the learned reverse variance, the variational
bound L_vlb (Ho et al. 2020 eq. 5) with its discretized Gaussian decoder, and the hybrid loss
L_simple + lambda L_vlb (iDDPM eq. 16).

A discrete VP schedule has increasing sigmas ``grid[0..T-1]``; latent t is x~_t = x0 + grid[t] n
(x~ = x / s, s = 1 / sqrt(1 + sigma^2)). Between s = grid[t] and sn = grid[t-1], in x~ units at sn:

- posterior q(x~_{t-1} | x~_t, x0) = N(x0 + (sn/s)^2 (x~_t - x0), beta-tilde),
  beta-tilde = sn^2 (s^2 - sn^2) / s^2
- the DDPM step's own variance beta = (s^2 - sn^2)(1 + sn^2) / (1 + s^2)

Both are the iDDPM quantities times (1 + sn^2), so the learned log-variance
frac log beta + (1 - frac) log beta-tilde, frac = (v + 1) / 2 (iDDPM eq. 15) is the same
interpolation here. Every KL is invariant under that common scaling. Terms are per dimension,
in bits, as improved-diffusion's ``_vb_terms_bpd``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from diffusionlab.diffusion.losses import DiffusionLoss
from diffusionlab.diffusion.noise import Generator, randn_like
from diffusionlab.diffusion.noise_distributions import NoiseDistribution, UniformT
from diffusionlab.diffusion.parameterizations import Parameterization
from diffusionlab.diffusion.schedules import Schedule, _check
from diffusionlab.diffusion.weightings import Weighting

DenoiseWithVariance = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
LOG2 = math.log(2.0)


def learned_log_variance(v: Tensor, log_small: Tensor | float, log_large: Tensor | float) -> Tensor:
    """frac log(beta) + (1 - frac) log(beta-tilde), frac = (v + 1) / 2 (iDDPM eq. 15)."""
    frac = (v + 1) / 2
    return frac * log_large + (1 - frac) * log_small


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (
        logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
        - 1
    )


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """log P(x) per element for 8-bit data x in [-1, 1] under N(mean, e^{2 log_std}) binned into
    256 bins of width 2/255 (Ho et al. 2020 eq. 13), the end bins reaching to -inf / +inf."""
    x64, mean64 = x.double(), mean.double()
    inv = torch.exp(-log_std.double())
    hi = (x64 - mean64 + 1 / 255) * inv
    lo = (x64 - mean64 - 1 / 255) * inv
    nd = torch.special.ndtr
    # the difference of two CDFs taken on the side of 0 where it does not cancel
    mid = torch.where(lo > 0, nd(-lo) - nd(-hi), nd(hi) - nd(lo)).clamp_min(1e-12).log()
    out = torch.where(
        x64 < -0.999,
        torch.special.log_ndtr(hi),
        torch.where(x64 > 0.999, torch.special.log_ndtr(-lo), mid),
    )
    return out.to(x.dtype)


def _grid(schedule: Schedule) -> Tensor:
    """The float64 sigmas of a discrete schedule's integer steps 0..T-1."""
    _check(
        schedule.discrete, "schedule", schedule, "L_vlb needs a discrete schedule (ddpm, cosine)"
    )
    return schedule.sigma(torch.arange(int(schedule.t_max) + 1, dtype=torch.float64))


def vb_terms(
    grid: Tensor, t: Tensor, x0: Tensor, x: Tensor, d: Tensor, v: Tensor, clip: bool = False
) -> Tensor:
    """L_{t-1} per sample in bits/dim for latents ``x`` = x~_t at integer steps ``t`` ``[B]``:
    KL(q(x~_{t-1} | x~_t, x0) || p(x~_{t-1} | x~_t)) for t >= 1, the decoder's
    -log p(x0 | x~_0) (discretized Gaussian) for t = 0 (Ho et al. 2020 eq. 5; iDDPM sec. 3.1).
    p has mean D + (sn/s)^2 (x~_t - D) and the learned log-variance from ``v``; at t = 0 its
    mean is D and beta-tilde is clipped to step 1's (improved-diffusion's ``posterior_log_variance
    _clipped``). ``clip`` clamps D to [-1, 1]."""
    grid = grid.to(x.device)
    shape = (-1,) + (1,) * (x.ndim - 1)
    d = d.clamp(-1, 1) if clip else d
    s = grid[t].view(shape)
    first = (t == 0).view(shape)
    sn = torch.where(first, grid[0] / 2, grid[(t - 1).clamp_min(0)].view(shape))  # dummy at t = 0
    r = (sn / s) ** 2
    log_small = torch.log(sn**2 * (s**2 - sn**2) / s**2)
    log_large = torch.log((s**2 - sn**2) * (1 + sn**2) / (1 + s**2))
    mean_q = x0 + r * (x - x0)
    mean_p = d + r * (x - d)
    kl = normal_kl(mean_q, log_small, mean_p, learned_log_variance(v, log_small, log_large))
    g0, g1 = grid[0], grid[1]
    log_small0 = torch.log(g0**2 * (g1**2 - g0**2) / (g1**2 * (1 + g0**2)))
    log_large0 = torch.log(g0**2 / (1 + g0**2))
    log_std0 = 0.5 * learned_log_variance(v, log_small0, log_large0)
    nll = -discretized_gaussian_log_likelihood(x0, d, log_std0)
    out = torch.where(first, nll, kl)
    return out.flatten(1).mean(1) / LOG2


def prior_bits(grid: Tensor, x0: Tensor) -> Tensor:
    """L_T per sample in bits/dim: KL(q(x_{T-1} | x0) || N(0, I)) in x = x~ / sqrt(1 + sigma^2)
    units, q = N(x0 / sqrt(1 + sigma^2), sigma^2 / (1 + sigma^2)), sigma = grid[T-1]."""
    s2 = grid[-1].to(x0.device) ** 2
    var = s2 / (1 + s2)
    kl = normal_kl(
        x0 / (1 + s2) ** 0.5, torch.log(var), torch.zeros_like(x0), torch.zeros_like(var)
    )
    return kl.flatten(1).mean(1) / LOG2


@torch.no_grad()
def vlb_bits_per_dim(
    denoise: DenoiseWithVariance,
    x0: Tensor,
    schedule: Schedule,
    generator: Generator = None,
    clip: bool = True,
) -> dict[str, Tensor]:
    """The full bound -log p(x0) <= L_0 + ... + L_{T-1} + L_T per sample, in bits/dim, on 8-bit
    data ``x0`` in [-1, 1] (iDDPM's ``calc_bpd_loop``: every step with fresh noise, T NFE).
    ``denoise(x, sigma)`` returns (D, v). Returns ``bpd``, ``prior`` and ``terms`` ``[B, T]``."""
    grid = _grid(schedule)
    work = x0.double() if x0.dtype == torch.float64 else x0.float()
    terms = []
    for t in range(len(grid)):
        sigma = torch.full((x0.shape[0],), float(grid[t]), dtype=work.dtype, device=x0.device)
        x = work + randn_like(work, generator) * float(grid[t])
        d, v = denoise(x, sigma)
        if v is None:
            raise ValueError(
                "the variational bound needs a model trained with "
                "parameterization.learned_variance=true"
            )
        idx = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
        terms.append(vb_terms(grid.to(work.dtype), idx, work, x, d, v, clip=clip))
    terms_t = torch.stack(terms, 1)
    prior = prior_bits(grid.to(work.dtype), work)
    return {"bpd": terms_t.sum(1) + prior, "prior": prior, "terms": terms_t}


class HybridLoss(DiffusionLoss):
    """L_hybrid = L_simple + lambda L_vlb (iDDPM eq. 16, lambda = 0.001): the parameterization's
    own MSE (``weighting``; eps-MSE for eps) plus ``vlb_weight`` T L_t with the mean's gradient
    stopped in L_t, so L_vlb trains only the variance (iDDPM sec. 3.1). T L_t is the single-term
    estimate of L_vlb = sum_t L_t for t uniform on 0..T-1; improved-diffusion's RESCALED_MSE
    uses the same vb * T / 1000. Needs a discrete schedule and ``learned_variance``."""

    def __init__(
        self,
        schedule: Schedule,
        parameterization: Parameterization,
        noise: NoiseDistribution | str | None = None,
        weighting: Weighting | str | None = None,
        vlb_weight: float = 0.001,
    ) -> None:
        _check(schedule.discrete, "schedule", schedule, "loss=hybrid needs a discrete schedule")
        _check(
            parameterization.learned_variance,
            "parameterization.learned_variance",
            False,
            "loss=hybrid trains a learned variance; set it to true (and model.out_channels to 2C)",
        )
        _check(vlb_weight >= 0, "loss.vlb_weight", vlb_weight, "must be >= 0")
        super().__init__(
            schedule, parameterization, UniformT() if noise is None else noise, weighting
        )
        self.vlb_weight = float(vlb_weight)

    def terms(
        self,
        denoiser: nn.Module,
        x0: Tensor,
        sigma: Tensor,
        n: Tensor,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
        cond: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(weighted MSE, L_t in bits/dim) per sample at noise levels ``sigma`` with noise ``n``."""
        x0_32 = x0.float()
        noisy = x0_32 + sigma.view(-1, *([1] * (x0.ndim - 1))) * n
        d, v = denoiser.forward_with_variance(
            noisy.to(x0.dtype),
            sigma,
            class_labels=class_labels,
            augment_labels=augment_labels,
            **(cond or {}),
        )
        grid = _grid(self.schedule).float()
        t = self.schedule.sigma_to_index(sigma).to(x0.device)
        vb = vb_terms(grid, t, x0_32, noisy, d.detach().float(), v.float())
        return self.weighted_error(d, x0_32, sigma), vb

    def forward(
        self,
        denoiser: nn.Module,
        x0: Tensor,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
        generator: Generator = None,
        cond: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Returns (per-sample L_hybrid ``[B]``, sigma ``[B]``)."""
        sigma = self.noise.sample(x0.shape[0], self.schedule, generator, device=x0.device)
        n = randn_like(x0.float(), generator)
        mse, vb = self.terms(denoiser, x0, sigma, n, class_labels, augment_labels, cond)
        return mse + self.vlb_weight * (self.schedule.t_max + 1) * vb, sigma

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, vlb_weight={self.vlb_weight:g}"
