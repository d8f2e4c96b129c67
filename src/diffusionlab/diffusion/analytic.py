"""Closed-form denoisers for Gaussian and Gaussian-mixture data in D-space (x~ = x0 + sigma n).

For x0 ~ N(mu, C), x~ ~ N(mu, C + sigma^2 I) and the ideal denoiser is
D(x~; sigma) = mu + C (C + sigma^2 I)^-1 (x~ - mu). Its probability-flow ODE
dx~/dsigma = (x~ - D) / sigma decouples in C's eigenbasis and has the exact solution
x~(sigma) = mu + sqrt((C + sigma^2 I)(C + sigma0^2 I)^-1) (x~(sigma0) - mu). For a mixture,
D is the posterior-weighted sum of the component denoisers (Karras et al. 2022, Appendix B.3).
Data are ``[B, d]`` (other shapes are flattened to ``[B, d]`` and restored).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusionlab.diffusion.noise import Generator, randn_like


def _sig(sigma: Tensor | float, x: Tensor) -> Tensor:
    """sigma as a ``[B, 1]`` or ``[1, 1]`` column in x's dtype."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1)
    if s.numel() > 1 and bool((s == s[0]).all()):  # a sampler's [B] sigma: one row suffices
        s = s[:1]
    return s.expand(x.shape[0], 1) if s.numel() > 1 else s


class GaussianMixture:
    """x0 ~ sum_k w_k N(mu_k, C_k); ``covs`` is ``[K, d, d]`` (full) or ``[K, d]`` (diagonal)."""

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor) -> None:
        means = torch.as_tensor(means)
        dtype = means.dtype if means.is_floating_point() else torch.float64
        self.weights = torch.as_tensor(weights, dtype=dtype)
        self.means = means.to(dtype)
        covs = torch.as_tensor(covs, dtype=dtype)
        K, d = self.means.shape
        if self.weights.shape != (K,) or not bool((self.weights > 0).all()):
            raise ValueError(f"weights must be {K} positive numbers, got {self.weights}")
        self.weights = self.weights / self.weights.sum()
        if covs.shape == (K, d):
            self.evals, self.evecs = covs, torch.eye(d, dtype=dtype).expand(K, d, d)
        elif covs.shape == (K, d, d):
            self.evals, self.evecs = torch.linalg.eigh(covs)
        else:
            raise ValueError(f"covs must be [{K}, {d}] or [{K}, {d}, {d}], got {tuple(covs.shape)}")
        if not bool((self.evals >= 0).all()):
            raise ValueError("covariances must be positive semi-definite")
        self.dim = d

    @property
    def covs(self) -> Tensor:
        """Full ``[K, d, d]`` covariances."""
        return self.evecs @ torch.diag_embed(self.evals) @ self.evecs.transpose(-1, -2)

    @property
    def mean(self) -> Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    @property
    def cov(self) -> Tensor:
        """Covariance of the mixture (law of total covariance)."""
        diff = self.means - self.mean
        return (
            self.weights[:, None, None] * (self.covs + diff[:, :, None] * diff[:, None, :])
        ).sum(0)

    def _parts(self, x: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """Per component: coordinates of x - mu_k in the eigenbasis, variances lambda + sigma^2,
        and the log-densities log N(x; mu_k, C_k + sigma^2 I). Shapes [B, K, d], [B, K, d], [B, K]."""
        s2 = _sig(sigma, x).pow(2)[:, :, None]
        y = torch.einsum("kde,bkd->bke", self.evecs.to(x), x[:, None, :] - self.means.to(x))
        var = self.evals.to(x)[None] + s2
        logp = -0.5 * ((y**2 / var).sum(-1) + var.log().sum(-1) + self.dim * math.log(2 * math.pi))
        return y, var, logp

    def log_prob(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        """log p_sigma(x~), the density of x0 + sigma n; ``[B]``."""
        x2 = x.reshape(x.shape[0], -1)
        _, _, logp = self._parts(x2, sigma)
        return torch.logsumexp(logp + self.weights.to(x).log(), dim=1)

    def denoise(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """D(x~; sigma) = sum_k p(k | x~) (mu_k + C_k (C_k + sigma^2 I)^-1 (x~ - mu_k))."""
        x2 = x.reshape(x.shape[0], -1)
        y, var, logp = self._parts(x2, sigma)
        post = torch.softmax(logp + self.weights.to(x).log(), dim=1)
        comp = self.means.to(x) + torch.einsum(
            "kde,bke->bkd", self.evecs.to(x), y * self.evals.to(x)[None] / var
        )
        return (post[:, :, None] * comp).sum(1).reshape(x.shape)

    __call__ = denoise

    def score(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """grad log p_sigma(x~) = (D(x~; sigma) - x~) / sigma^2 (Tweedie)."""
        s = _sig(sigma, x.reshape(x.shape[0], -1)).reshape(-1, *([1] * (x.dim() - 1)))
        return (self.denoise(x, sigma) - x) / s**2

    def sample(self, n: int, generator: Generator = None, sigma: float = 0.0) -> Tensor:
        """``n`` draws of x0 + sigma n (float64 unless the parameters are float32)."""
        z = randn_like(torch.empty(n, self.dim, dtype=self.means.dtype), generator)
        if len(self.weights) == 1:
            k = torch.zeros(n, dtype=torch.long)
        else:
            u = (
                torch.rand(n, dtype=torch.float64, generator=generator)
                if isinstance(generator, torch.Generator)
                else torch.rand(n, dtype=torch.float64)
            )
            k = torch.searchsorted(self.weights.cumsum(0).to(torch.float64), u).clamp_max(
                len(self.weights) - 1
            )
        std = self.evals[k].clamp_min(0).sqrt()
        x0 = self.means[k] + torch.einsum("bde,be->bd", self.evecs[k], std * z)
        if sigma > 0:
            x0 = x0 + sigma * randn_like(x0, generator)
        return x0


class Gaussian(GaussianMixture):
    """x0 ~ N(mean, cov), ``cov`` ``[d, d]`` (full) or ``[d]`` (diagonal); adds the exact ODE flow."""

    def __init__(self, mean: Tensor, cov: Tensor) -> None:
        mean = torch.as_tensor(mean)
        super().__init__(torch.ones(1), mean[None], torch.as_tensor(cov)[None])

    def ode_solution(self, x: Tensor, sigma0: float, sigma: float) -> Tensor:
        """Exact probability-flow ODE map x~(sigma0) -> x~(sigma):
        mu + U diag(sqrt((lambda + sigma^2) / (lambda + sigma0^2))) U^T (x~ - mu)."""
        x2 = x.reshape(x.shape[0], -1)
        ev, U = self.evals[0].to(x), self.evecs[0].to(x)
        mu = self.means[0].to(x)
        ratio = ((ev + sigma**2) / (ev + sigma0**2)).sqrt()
        return (mu + ((x2 - mu) @ U) * ratio @ U.T).reshape(x.shape)
