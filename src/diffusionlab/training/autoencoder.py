"""Training, saving and loading the KL autoencoder of latent diffusion (``networks/autoencoder.py``).

Loss per image, as latent-diffusion's ``LPIPSWithDiscriminator`` without its LPIPS and GAN terms
(and without its learned output log-variance): the reconstruction error summed over pixels
(L1 or L2) plus ``kl_weight`` times ``KL(N(mean, exp(logvar)) || N(0, I))`` summed over the latent
(Kingma & Welling 2014, appendix B); averaged over the batch.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusionlab.errors import ConfigError
from diffusionlab.files import atomic_write
from diffusionlab.networks.autoencoder import AutoencoderKL

log = logging.getLogger(__name__)


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(mean, diag exp(logvar)) || N(0, I))`` per sample, summed over the latent."""
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1)


def autoencoder_loss(
    ae: AutoencoderKL, x: Tensor, noise: Tensor, kl_weight: float, recon: str = "l1"
) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, parts) of a batch ``x`` in [-1, 1] with reparameterisation ``noise``."""
    out, mean, logvar = ae(x, noise)
    err = (out - x).abs() if recon == "l1" else (out - x).square()
    rec = err.flatten(1).sum(1).mean()
    kl = kl_divergence(mean, logvar).mean()
    mse = (out - x).square().mean()
    return rec + kl_weight * kl, {"recon": rec.detach(), "kl": kl.detach(), "mse": mse.detach()}


@torch.no_grad()
def reconstruction_mse(ae: AutoencoderKL, images: Tensor, batch_size: int = 256) -> float:
    """Mean squared error per pixel of ``decode(posterior mean)`` against ``images`` in [-1, 1]."""
    ae.eval()
    total = 0.0
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size]
        mean, _ = ae.encode(x)
        total += float((ae.decode(mean).clamp(-1, 1) - x).square().sum())
    return total / images.numel()


def split_held_out(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train, held-out) indices: a seeded permutation, the last ``fraction`` held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = max(1, int(round(n * fraction)))
    return perm[:-held], perm[-held:]


def train_autoencoder(
    ae: AutoencoderKL,
    images: Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    kl_weight: float,
    recon: str,
    seed: int,
    max_seconds: float | None = None,
    log_every: int = 100,
) -> dict[str, float]:
    """Adam on random batches of ``images`` for ``steps`` steps (or ``max_seconds``); returns
    the steps done, the seconds spent and the last batch's loss parts."""
    if recon not in ("l1", "l2"):
        raise ConfigError(f"loss.recon={recon!r} must be l1 or l2")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    ae.train()
    t0 = time.time()
    step, parts = 0, {}
    while step < steps and (max_seconds is None or time.time() - t0 < max_seconds):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        x = images[idx]
        noise = torch.randn(x.shape[0], *ae.latent_shape(x.shape[1:]), generator=g)
        loss, parts = autoencoder_loss(ae, x, noise, kl_weight, recon)
        if not math.isfinite(float(loss.detach())):
            raise ConfigError(
                f"autoencoder loss is {float(loss.detach())} at step {step}; lower lr"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if log_every and step % log_every == 0:
            log.info("step %d: %s", step, {k: round(float(v), 4) for k, v in parts.items()})
    ae.eval()
    return {"steps": step, "seconds": time.time() - t0, **{k: float(v) for k, v in parts.items()}}


def save_autoencoder(path: Path, ae: AutoencoderKL, config: dict, meta: dict[str, Any]) -> None:
    """``{"config": the AutoencoderKL arguments, "state_dict", "meta": how it was made}``."""
    state = {"config": config, "state_dict": ae.state_dict(), "meta": meta}
    atomic_write(path, lambda f: torch.save(state, f))
