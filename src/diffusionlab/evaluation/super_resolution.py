"""How good an upsampler is (docs/conditioning.md), measured beside bicubic upsampling:

- PSNR against the true high-resolution image (8-bit images, per image, averaged): fidelity,
  which favours the blurry mean (SR3 reports it alongside sample quality for this reason);
- FID (and KID) of the upsampled set against real high-resolution images, with the domain
  feature extractor: whether the outputs look like real digits;
- the consistency error: RMS difference, in 8-bit grey levels, between the output downsampled
  exactly as the training condition was made (area averaging) and the input it was given: a
  faithful upsampler invents detail only where the input leaves it undetermined.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusionlab.sampling.images import to_uint8


def quantised(x: Tensor) -> Tensor:
    """Images in [-1, 1] rounded to 8 bits, as a saved PNG holds them, as floats in [0, 255]."""
    return to_uint8(x).float()


def psnr(x: Tensor, reference: Tensor) -> Tensor:
    """Per-image PSNR in dB of 8-bit images ``x`` against ``reference`` (both [-1, 1])."""
    mse = (quantised(x) - quantised(reference)).square().flatten(1).mean(1)
    return 10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))


def bicubic(low: Tensor, factor: int) -> Tensor:
    """The bicubic baseline (Keys' a = -0.75, as torch), clipped to [-1, 1]."""
    return F.interpolate(low, scale_factor=factor, mode="bicubic", align_corners=False).clamp(-1, 1)


def consistency_error(x: Tensor, low: Tensor, factor: int) -> Tensor:
    """Per-image RMS difference in 8-bit levels between ``x`` (8-bit) area-downsampled by
    ``factor`` and the input ``low``."""
    down = F.avg_pool2d(quantised(x), factor)
    return (down - (low.float() + 1) * 127.5).square().flatten(1).mean(1).sqrt()


def fidelity_metrics(x: Tensor, low: Tensor, truth: Tensor | None, factor: int) -> dict[str, float]:
    """``psnr`` (with ``truth``) and ``consistency`` (mean over images) of upsampled ``x``."""
    out = {"consistency": consistency_error(x, low, factor).mean().item()}
    if truth is not None:
        out["psnr"] = psnr(x, truth).mean().item()
    return out
