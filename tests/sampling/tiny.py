"""A tiny checkpoint written without training: the default config's unet_tiny on 8x8 digits with
seeded random weights (so every image depends on the network), saved as train.py saves one."""

from __future__ import annotations

from pathlib import Path

import torch

from app.helpers import compose_train, fast_overrides
from diffusionlab.cli.train import build


def tiny_ckpt(folder: Path, label_dim: int = 0, seed: int = 0) -> Path:
    """``<folder>/tiny.ckpt`` (class-conditional with ``label_dim`` > 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = compose_train([*fast_overrides(folder), f"label_dim={label_dim}"], folder / "run")
    module, _ = build(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.denoiser.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        module.ema.load_state_dict(module.denoiser.state_dict())
    path = folder / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path
