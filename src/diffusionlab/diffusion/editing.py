"""Editing given images with a trained denoiser: SDEdit and RePaint inpainting, in sigma-space.

Both see only ``denoise(x, sigma)`` (a ``[B]`` sigma) and a decreasing sigma grid ending at 0, as
the samplers do (``samplers.py``); noise comes from per-sample generators (``noise.py``), so a
result does not depend on how inputs are batched.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusionlab.diffusion.noise import Generator, randn_like
from diffusionlab.diffusion.samplers import Denoise, Sampler, check_sigmas


def truncate_sigmas(sigmas: Tensor, sigma_start: float) -> Tensor:
    """The part of a decreasing grid (ending at 0) below ``sigma_start``, with ``sigma_start``
    put in front: the grid a sampler follows when it starts from noise level ``sigma_start``."""
    check_sigmas(sigmas)
    if not sigma_start > 0:
        raise ValueError(f"sigma_start must be > 0, got {sigma_start}")
    below = sigmas[sigmas < sigma_start]
    return torch.cat([below.new_tensor([float(sigma_start)]), below])


def sdedit(
    denoise: Denoise,
    x0: Tensor,
    sigma_edit: float,
    sigmas: Tensor,
    sampler: Sampler,
    generator: Generator = None,
) -> Tensor:
    """SDEdit (Meng et al. 2022, Alg. 1 in EDM form): perturb x0 to x0 + sigma_edit n, then run
    ``sampler`` on ``sigmas`` truncated at sigma_edit. ``sigma_edit = 0`` returns x0 unchanged;
    a large sigma_edit forgets x0 and samples afresh."""
    if sigma_edit < 0:
        raise ValueError(f"sigma_edit must be >= 0, got {sigma_edit}")
    if sigma_edit == 0:
        return x0.clone()
    grid = truncate_sigmas(sigmas, sigma_edit).to(x0.device)
    x = x0 + sigma_edit * randn_like(x0, generator)
    return sampler(denoise, x, grid, generator=generator)


def repaint(
    denoise: Denoise,
    x_known: Tensor,
    mask: Tensor,
    sigmas: Tensor,
    resample: int = 1,
    generator: Generator = None,
) -> Tensor:
    """Inpainting by replacement with resampling (RePaint, Lugmayr et al. 2022, Alg. 1).

    ``mask`` (bool, broadcastable to ``x_known``) is True where pixels are generated; elsewhere the
    result equals ``x_known`` bitwise. Each step from sigma_i to sigma_{i+1}: the known region is
    replaced by x_known + sigma_i n, then one DDPM ancestral step (posterior mean
    D + (sigma_{i+1}/sigma_i)^2 (x - D) plus noise of variance
    sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2) is taken; ``resample`` U > 1 renoises
    the result back to sigma_i (variance sigma_i^2 - sigma_{i+1}^2) and repeats, U times in all.
    Costs U NFE per step (1 for the last step, to sigma = 0)."""
    check_sigmas(sigmas)
    if int(resample) < 1:
        raise ValueError(f"resample must be >= 1, got {resample}")
    mask = mask.to(device=x_known.device, dtype=torch.bool)
    sig = sigmas.tolist()
    x = sig[0] * randn_like(x_known, generator)
    for s, sn in zip(sig[:-1], sig[1:], strict=True):
        rounds = int(resample) if sn > 0 else 1
        for u in range(rounds):
            x = torch.where(mask, x, x_known + s * randn_like(x_known, generator))
            den = denoise(x, x.new_full((x.shape[0],), s))
            x = den + (sn / s) ** 2 * (x - den)
            if sn > 0:
                x = x + randn_like(x, generator) * (sn * math.sqrt(s**2 - sn**2) / s)
                if u < rounds - 1:
                    x = x + randn_like(x, generator) * math.sqrt(s**2 - sn**2)
    return torch.where(mask, x, x_known)
