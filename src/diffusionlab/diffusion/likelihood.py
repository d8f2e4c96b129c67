"""Log-likelihood and bits per dimension through the probability-flow ODE (Song et al. 2021,
Appendix D.2; score_sde ``likelihood.py``), written in sigma-space.

With dx~/dsigma = f(x~, sigma) = (x~ - D(x~; sigma)) / sigma (EDM eq. 4), the instantaneous change
of variables gives d log p_sigma(x~(sigma)) / dsigma = -div f, so
log p_{sigma_min}(x) = log N(x~(sigma_max); 0, sigma_max^2 I) + int_{sigma_min}^{sigma_max} div f dsigma.
The ODE and the integral are solved together in log-sigma (dx~/dlog sigma = x~ - D, on which
the adaptive step is nearly uniform) with scipy's RK45; the divergence is exact (one
vector-Jacobian product per dimension) or Hutchinson's estimate eps^T (df/dx) eps with one fixed
probe per sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

Denoise = Callable[[Tensor, Tensor], Tensor]
DIVERGENCES = ("exact", "hutchinson")


@dataclass
class Likelihood:
    """Per-sample ``log_prob`` [B] of x under p_{sigma_min}, the prior point ``z`` [B, ...] at
    sigma_max, and the number of denoiser evaluations ``nfe`` the solver spent."""

    log_prob: Tensor
    z: Tensor
    nfe: int


def _divergence(f: Tensor, x: Tensor, method: str, eps: Tensor | None) -> Tensor:
    """Per-sample divergence of f(x) (both ``[B, ...]``, x requires grad)."""
    if method == "hutchinson":
        (g,) = torch.autograd.grad(f, x, grad_outputs=eps)
        return (g * eps).flatten(1).sum(1)
    f2 = f.flatten(1)
    div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(f2.shape[1]):
        (g,) = torch.autograd.grad(f2[:, i].sum(), x, retain_graph=i < f2.shape[1] - 1)
        div = div + g.flatten(1)[:, i]
    return div


def log_likelihood(
    denoise: Denoise,
    x: Tensor,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    divergence: str = "hutchinson",
    probe: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    generator: torch.Generator | None = None,
) -> Likelihood:
    """log p_{sigma_min}(x) for data ``x`` (``[B, ...]``) under the model ``denoise(x~, sigma)``.

    ``divergence`` is ``exact`` (D backward passes per evaluation) or ``hutchinson`` (one; the
    probe, ``rademacher`` or ``gaussian``, is drawn once per sample and held fixed along the
    trajectory, which keeps the estimate unbiased).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r}: choose one of {DIVERGENCES}")
    shape, dtype, device = x.shape, x.dtype, x.device
    n = x[0].numel()
    eps = None
    if divergence == "hutchinson":
        eps = torch.randn(shape, generator=generator, dtype=dtype).to(device)
        if probe == "rademacher":
            eps = eps.sign()
        elif probe != "gaussian":
            raise ValueError(f"probe={probe!r}: choose 'rademacher' or 'gaussian'")
    nfe = 0

    def rhs(log_sigma: float, state: np.ndarray) -> np.ndarray:
        nonlocal nfe
        nfe += 1
        xs = torch.from_numpy(state[: -shape[0]]).to(device=device, dtype=dtype).view(shape)
        sig = torch.full((shape[0],), math.exp(log_sigma), dtype=dtype, device=device)
        with torch.enable_grad():
            xs.requires_grad_(True)
            f = xs - denoise(xs, sig)  # sigma * dx~/dsigma
            div = _divergence(f, xs, divergence, eps)
        out = torch.cat([f.detach().flatten(), div.detach()])
        return out.double().cpu().numpy()

    state0 = np.concatenate([x.detach().double().cpu().flatten().numpy(), np.zeros(shape[0])])
    span = (math.log(sigma_min), math.log(sigma_max))
    sol = solve_ivp(rhs, span, state0, rtol=rtol, atol=atol, method="RK45")
    if not sol.success:
        raise RuntimeError(f"probability-flow ODE solve failed: {sol.message}")
    end = torch.from_numpy(sol.y[:, -1])
    z = end[: -shape[0]].view(shape).to(dtype)
    delta = end[-shape[0] :]
    prior = -0.5 * (z.double().flatten(1).pow(2).sum(1) / sigma_max**2) - 0.5 * n * math.log(
        2 * math.pi * sigma_max**2
    )
    return Likelihood(log_prob=(prior + delta).to(dtype), z=z, nfe=nfe)


def dequantize(
    images: Tensor, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """uint8 images (values k) -> uniformly dequantised data in [-1, 1): 2 (k + u) / 256 - 1."""
    u = torch.rand(images.shape, generator=generator, dtype=torch.float64)
    return (2 * (images.double().cpu() + u) / 256 - 1).to(device=images.device, dtype=dtype)


def bits_per_dim(log_prob: Tensor, dim: int) -> Tensor:
    """Bits per dimension of 8-bit data from the log density of its dequantised version in
    [-1, 1]: -log2 p / dim + 8 - 1 (the 2x scale from [0, 1] to [-1, 1] gives the -1)."""
    return -log_prob / (dim * math.log(2)) + 7.0


def image_bits_per_dim(
    denoise: Denoise,
    images: Tensor,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    **kwargs,
) -> tuple[Tensor, int]:
    """Per-image bits/dim of uint8 ``images`` (dequantised with ``generator``) and the NFE spent;
    ``kwargs`` go to :func:`log_likelihood`."""
    x = dequantize(images, generator, dtype)
    result = log_likelihood(denoise, x, generator=generator, **kwargs)
    return bits_per_dim(result.log_prob, x[0].numel()), result.nfe
