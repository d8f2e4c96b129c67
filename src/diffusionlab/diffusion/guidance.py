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


def _guided(d_cond: Tensor, d_uncond: Tensor, w: float, variance: Tensor | None) -> Tensor:
    """D_uncond + w (D_cond - D_uncond), carrying the conditional iDDPM variance output; as
    ``torch.lerp`` (one rounding, and EDM2's generator's own formula)."""
    out = torch.lerp(d_uncond, d_cond, w)
    if variance is not None:
        out.learned_variance = variance
    return out


def cfg_denoiser(denoise_cond: Denoise, denoise_uncond: Denoise, w: float) -> Denoise:
    """D_uncond + w (D_cond - D_uncond); also autoguidance with ``denoise_uncond`` a weaker model.
    An iDDPM variance output (the ``learned_variance`` attribute of D) is the conditional one's."""

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        d_cond = denoise_cond(x, sigma)
        return _guided(
            d_cond, denoise_uncond(x, sigma), w, getattr(d_cond, "learned_variance", None)
        )

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


def _cat(a: Tensor | dict, b: Tensor | dict) -> Tensor | dict:
    """Two batches of conditions, one after the other (a dict: per network input)."""
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


def label_cfg_denoiser(
    denoise: LabelDenoise,
    class_labels: Tensor | dict,
    w: float,
    uncond: Tensor | dict | None = None,
) -> Denoise:
    """CFG from one conditional denoiser ``denoise(x, sigma, cond)``, evaluating cond and uncond
    in one batch of 2B; ``uncond`` is the unconditional input (default: the all-zeros one-hot).
    A condition may be a dict of tensors (the inputs of a text or image condition)."""
    labels = _cat(class_labels, torch.zeros_like(class_labels) if uncond is None else uncond)

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        sig2 = torch.cat([sigma, sigma]) if sigma.dim() > 0 else sigma
        d = denoise(torch.cat([x, x]), sig2, labels)
        v = getattr(d, "learned_variance", None)
        d_cond, d_uncond = d.chunk(2)
        return _guided(d_cond, d_uncond, w, None if v is None else v.chunk(2)[0])

    return guided
