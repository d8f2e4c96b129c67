"""Classifier-free guidance and autoguidance as denoise wrappers that every sampler accepts.

CFG (Ho & Salimans 2022) and autoguidance (Karras et al. 2024, eq. 1) share one formula,
D_w(x; sigma) = D_uncond + w (D_cond - D_uncond): CFG's "uncond" is the same network with an empty
label, autoguidance's is a weaker (smaller / less trained) model. w = 1 is the conditional model.
A guided denoiser costs two network evaluations per sampler NFE. With a guidance interval
(Kynkaanniemi et al. 2024) guidance applies only for sigma in (sigma_lo, sigma_hi].
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffusionlab.diffusion.samplers import Denoise
from diffusionlab.errors import ConfigError


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

    def denoise(x: Tensor, sigma: Tensor, **kw: Tensor) -> Tensor:
        d_cond = denoise_cond(x, sigma, **kw)
        return _guided(
            d_cond, denoise_uncond(x, sigma, **kw), w, getattr(d_cond, "learned_variance", None)
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

    def twice(v: Tensor, x: Tensor) -> Tensor:
        v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
        return torch.cat([v, v]) if v.dim() > 0 else v

    def guided(x: Tensor, sigma: Tensor, **kw: Tensor) -> Tensor:
        kw = {k: twice(v, x) for k, v in kw.items()}
        d = denoise(torch.cat([x, x]), twice(sigma, x), labels, **kw)
        v = getattr(d, "learned_variance", None)
        d_cond, d_uncond = d.chunk(2)
        return _guided(d_cond, d_uncond, w, None if v is None else v.chunk(2)[0])

    return guided


def check_guidance_interval(value, key: str = "guidance_interval") -> tuple[float, float] | None:
    """A ``[sigma_lo, sigma_hi]`` setting checked (``0 <= lo < hi``, hi may be ``inf``), or None
    for guidance at every sigma. Raises :class:`ConfigError` naming ``key``."""
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{key}={value!r} must be [sigma_lo, sigma_hi] (e.g. [0.28, 5.42]) or null"
        ) from None
    if not (0.0 <= lo < hi) or math.isnan(hi):
        raise ConfigError(f"{key}={value!r} needs 0 <= sigma_lo < sigma_hi")
    return lo, hi


def interval_denoiser(guided: Denoise, plain: Denoise, lo: float, hi: float) -> Denoise:
    """Guidance in a limited interval (Kynkaanniemi et al. 2024, sec. 3): the ``guided`` denoiser
    for samples whose sigma is in ``(lo, hi]``, the ``plain`` conditional one elsewhere, which
    then costs one network evaluation instead of two. Decided per sample; a step whose samples
    all fall on one side evaluates only that side (one read of the sigmas per evaluation)."""

    def denoise(x: Tensor, sigma: Tensor, **kw: Tensor) -> Tensor:
        s = torch.as_tensor(sigma, device=x.device).detach()
        inside = (s > lo) & (s <= hi)
        if bool(inside.all()):
            return guided(x, sigma, **kw)
        if not bool(inside.any()):
            return plain(x, sigma, **kw)
        d_plain = plain(x, sigma, **kw)
        mask = inside.reshape(-1, *([1] * (x.ndim - 1)))
        out = torch.where(mask, guided(x, sigma, **kw), d_plain)
        variance = getattr(d_plain, "learned_variance", None)
        if variance is not None:
            out.learned_variance = variance
        return out

    return denoise
