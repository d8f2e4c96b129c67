"""The image format every metric sees: uint8 RGB NCHW (torch-fidelity's convention)."""

from __future__ import annotations

import torch
from torch import Tensor


def to_uint8_rgb(x: Tensor) -> Tensor:
    """[-1, 1] float NCHW -> uint8 NCHW with 3 channels (grey repeated), EDM's rounding."""
    x = (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x
