"""Latents of a diffusion model: deterministic inversion of the probability-flow ODE and spherical
interpolation between latents (or between standard-normal noises)."""

from __future__ import annotations

import torch
from torch import Tensor

from diffusionlab.diffusion.samplers import Denoise, check_sigmas

INVERSION_SOLVERS = ("euler", "heun")


def invert_ode(denoise: Denoise, x0: Tensor, sigmas: Tensor, solver: str = "heun") -> Tensor:
    """Integrate the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (EDM eq. 4) from
    data up to noise on a sampler's grid read backwards: x0 stands in for x(sigma_min) (the
    smallest positive sigma; the error is O(sigma_min^2)), then Euler or Heun (EDM Alg. 1 run
    upwards) steps reach x(sigmas[0]). Sampling that latent with the same deterministic solver on
    ``sigmas`` gives x0 back up to the discretization error (DDIM inversion, Song et al. 2021,
    Sec. 5.4). Costs 2 (N - 1) NFE with Heun and N - 1 with Euler for N positive sigmas."""
    check_sigmas(sigmas)
    if solver not in INVERSION_SOLVERS:
        raise ValueError(
            f"unknown inversion solver {solver!r}; valid: {', '.join(INVERSION_SOLVERS)}"
        )
    up = sigmas[:-1].flip(0).tolist()
    x = x0

    def slope(x: Tensor, s: float) -> Tensor:
        return (x - denoise(x, x.new_full((x.shape[0],), s))) / s

    for s, sn in zip(up[:-1], up[1:], strict=True):
        d = slope(x, s)
        x_next = x + (sn - s) * d
        if solver == "heun":
            x_next = x + (sn - s) * 0.5 * (d + slope(x_next, sn))
        x = x_next
    return x


def slerp(z0: Tensor, z1: Tensor, t: float | Tensor) -> Tensor:
    """Spherical linear interpolation per sample (Shoemake 1985):
    sin((1 - t) theta) / sin(theta) z0 + sin(t theta) / sin(theta) z1 with theta the angle between
    the flattened z0[i] and z1[i]; linear where the two are (anti)parallel to within 1e-7.
    Endpoints are z0 and z1; equal norms give that norm for every t."""
    if z0.shape != z1.shape:
        raise ValueError(f"slerp needs equal shapes, got {tuple(z0.shape)} and {tuple(z1.shape)}")
    a, b = z0.flatten(1), z1.flatten(1)
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device).reshape(-1, 1)
    cos = (a * b).sum(1, keepdim=True) / (a.norm(dim=1, keepdim=True) * b.norm(dim=1, keepdim=True))
    theta = cos.clamp(-1, 1).arccos()
    sin = theta.sin()
    flat = sin.abs() < 1e-7
    safe = torch.where(flat, torch.ones_like(sin), sin)
    wa = torch.where(flat, 1 - t, ((1 - t) * theta).sin() / safe)
    wb = torch.where(flat, t, (t * theta).sin() / safe)
    return (wa * a + wb * b).reshape(z0.shape)
