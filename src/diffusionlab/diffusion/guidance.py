"""Classifier-free guidance and autoguidance as denoise wrappers that every sampler accepts.

CFG (Ho & Salimans 2022) and autoguidance (Karras et al. 2024, eq. 1) share one formula,
D_w(x; sigma) = D_uncond + w (D_cond - D_uncond): CFG's "uncond" is the same network with an empty
label, autoguidance's is a weaker (smaller / less trained) model. w = 1 is the conditional model.
A guided denoiser costs two network evaluations per sampler NFE.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffusionlab.diffusion.samplers import Denoise


def cfg_denoiser(denoise_cond: Denoise, denoise_uncond: Denoise, w: float) -> Denoise:
    """D_uncond + w (D_cond - D_uncond); also autoguidance with ``denoise_uncond`` a weaker model."""

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        d_uncond = denoise_uncond(x, sigma)
        return d_uncond + w * (denoise_cond(x, sigma) - d_uncond)

    return denoise


LabelDenoise = Callable[[Tensor, Tensor, Tensor], Tensor]


def conditional_pair(denoise: LabelDenoise, class_labels: Tensor) -> tuple[Denoise, Denoise]:
    """(cond, uncond) from one denoiser ``denoise(x, sigma, class_labels)``; uncond gets the
    all-zeros one-hot, the label the network saw under label dropout."""
    empty = torch.zeros_like(class_labels)
    return (
        lambda x, sigma: denoise(x, sigma, class_labels),
        lambda x, sigma: denoise(x, sigma, empty),
    )


def label_cfg_denoiser(denoise: LabelDenoise, class_labels: Tensor, w: float) -> Denoise:
    """CFG from one label-conditional denoiser, evaluating cond and uncond in one batch of 2B."""
    labels = torch.cat([class_labels, torch.zeros_like(class_labels)])

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        sig2 = torch.cat([sigma, sigma]) if sigma.dim() > 0 else sigma
        d_cond, d_uncond = denoise(torch.cat([x, x]), sig2, labels).chunk(2)
        return d_uncond + w * (d_cond - d_uncond)

    return guided
