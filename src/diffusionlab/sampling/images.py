"""Turning samples into images: uint8 (EDM's rounding), the uint8 RGB every metric sees, and the
files a person looks at (image grids, 2-D scatter plots)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from torch import Tensor


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] float images -> uint8 [0, 255] (EDM generate.py rounding)."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def to_uint8_rgb(x: Tensor) -> Tensor:
    """[-1, 1] float NCHW -> uint8 NCHW with 3 channels (grey repeated): torch-fidelity's format."""
    x = to_uint8(x)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def image_grid(x: Tensor, nrow: int | None = None) -> Tensor:
    """[N, C, H, W] images in [-1, 1] -> one uint8 [C, H', W'] grid with 1-pixel gaps."""
    from torchvision.utils import make_grid

    nrow = nrow or max(1, math.isqrt(x.shape[0] - 1) + 1)
    return make_grid(to_uint8(x), nrow=nrow, padding=1, pad_value=0)


def save_samples_png(x: Tensor, path: Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Save an image grid (NCHW, ``nrow`` images per row, default square; each pixel drawn as a
    ``scale`` x ``scale`` block) or a scatter plot (``[N, 2]`` points) as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if x.ndim == 4:
        from torchvision.io import write_png

        grid = image_grid(x, nrow)
        if grid.shape[0] == 1:
            grid = grid.expand(3, -1, -1)
        grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2).contiguous()
        write_png(grid, str(path))
    elif x.ndim == 2 and x.shape[1] == 2:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
        ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=2, alpha=0.6)
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
    else:
        raise ValueError(f"cannot draw samples of shape {tuple(x.shape)}")
    return path


def log_image(logger: Logger, key: str, path: Path, step: int) -> None:
    """Send a PNG to the loggers that take images (W&B, TensorBoard); CSV ignores it."""
    if isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[str(path)], step=step)
    elif isinstance(logger, TensorBoardLogger):
        from torchvision.io import read_image

        logger.experiment.add_image(key, read_image(str(path)), global_step=step)
