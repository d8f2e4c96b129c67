"""Bits/dim of reference images under a trained model: through the probability-flow ODE
(``diffusion/likelihood.py``) or iDDPM's variational bound (``diffusion/iddpm.py``)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from diffusionlab.data.datasets import TensorImageDataset, split_indices
from diffusionlab.diffusion.iddpm import vlb_bits_per_dim
from diffusionlab.diffusion.likelihood import image_bits_per_dim
from diffusionlab.diffusion.noise import StackedRandomGenerator
from diffusionlab.evaluation.plan import BitsPerDim
from diffusionlab.sampling.conditioning import CondDenoise, condition_of, conditioned
from diffusionlab.sampling.generator import denoiser_of
from diffusionlab.sampling.images import to_uint8_rgb
from diffusionlab.training.module import DiffusionModule


def bits_per_dim(
    bpd: BitsPerDim, module: DiffusionModule, data: TensorImageDataset, split: str, use_ema: bool
) -> dict[str, float]:
    """Mean bits/dim of the first ``bpd.num_images`` images of ``split`` under the (EMA) model,
    each given its label when the model is conditional: ``method=ode`` through the
    probability-flow ODE, ``vlb`` by the variational bound."""
    denoiser = denoiser_of(module, use_ema)
    condition = condition_of(module)
    idx = split_indices(len(data), split)[: bpd.num_images]
    images = to_uint8_rgb(data.images[idx])[:, : data.images.shape[1]]
    labels = None if condition is None else condition.encode(data.labels[idx].to(module.device))
    if bpd.method == "vlb":
        return _vlb(
            bpd, conditioned(denoiser.forward_with_variance, condition), module, images, labels
        )
    denoise = conditioned(denoiser, condition)
    gen = torch.Generator().manual_seed(0)
    bpds, nfes = [], []
    bs = bpd.batch_size
    for s in range(0, images.shape[0], bs):
        lab = labels[s : s + bs] if labels is not None else None
        value, nfe = image_bits_per_dim(
            lambda x, sigma, lab=lab: denoise(x, sigma, lab),
            images[s : s + bs].to(module.device),
            gen,
            divergence=bpd.divergence,
            rtol=bpd.tolerance,
            atol=bpd.tolerance,
            sigma_min=module.schedule.sigma_min,
            sigma_max=module.schedule.sigma_max,
        )
        bpds.append(value.cpu())
        nfes.append(nfe)
    out = torch.cat(bpds)
    return {
        "bpd": out.mean().item(),
        "bpd_stderr": (out.std() / len(out) ** 0.5).item(),
        "nfe_mean": float(np.mean(nfes)),
    }


def _vlb(
    bpd: BitsPerDim,
    denoise: CondDenoise,
    module: DiffusionModule,
    images: Tensor,
    labels: Tensor | None,
) -> dict[str, float]:
    """iDDPM's bound on 8-bit ``images`` with ``denoise`` returning (D, variance), T NFE per
    batch; the noise of image i comes from seed i, whatever the batch size."""
    x0 = images.to(module.device).float() / 127.5 - 1
    bs = bpd.batch_size
    bpds, priors = [], []
    for s in range(0, x0.shape[0], bs):
        lab = labels[s : s + bs] if labels is not None else None
        gen = StackedRandomGenerator(range(s, min(s + bs, x0.shape[0])), device=module.device)
        out = vlb_bits_per_dim(
            lambda x, sigma, lab=lab: denoise(x, sigma, lab), x0[s : s + bs], module.schedule, gen
        )
        bpds.append(out["bpd"].cpu())
        priors.append(out["prior"].cpu())
    value = torch.cat(bpds)
    return {
        "bpd": value.mean().item(),
        "bpd_stderr": (value.std() / len(value) ** 0.5).item(),
        "bpd_prior": torch.cat(priors).mean().item(),
        "nfe_mean": float(module.schedule.t_max + 1),
    }
