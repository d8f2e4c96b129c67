"""EDM2's latent decoding: ``StabilityVAEEncoder.decode`` through a diffusers ``AutoencoderKL``
read from a local folder (nothing is downloaded).

EDM2 (training/encoders.py) maps its final latents z back to raw VAE latents with a per-channel
scale and bias, ``(z - bias) / scale``, decodes them and stores ``uint8(clamp(y, 0, 1) * 255)``
(truncation). The folder is found, in this order, at ``$DL_VAE_DIR``, or beside the model as the
VAE's name (``sd-vae-ft-mse/``, ``stabilityai--sd-vae-ft-mse/`` or
``stabilityai/sd-vae-ft-mse/``), e.g. ``huggingface-cli download stabilityai/sd-vae-ft-mse
--local-dir <model dir>/sd-vae-ft-mse`` on a machine with internet.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from diffusionlab.errors import ConfigError

ENV = "DL_VAE_DIR"


def vae_candidates(name: str, near: str | Path) -> list[Path]:
    """Where the diffusers folder of VAE ``name`` may be, in the order they are tried."""
    near = Path(near)
    found = [Path(os.environ[ENV]).expanduser()] if os.environ.get(ENV) else []
    return [*found, near / name.split("/")[-1], near / name.replace("/", "--"), near / name]


def find_vae(name: str, near: str | Path) -> Path | None:
    """The first candidate folder that holds a diffusers model (``config.json``)."""
    for path in vae_candidates(name, near):
        if (path / "config.json").is_file():
            return path
    return None


class StabilityVAEDecoder(nn.Module):
    """EDM2 latents ``[B, 4, H, W]`` -> images ``[B, 3, 8H, 8W]`` through ``AutoencoderKL``.

    The output is in our [-1, 1] convention, placed so that :func:`evaluation.images.to_uint8_rgb`
    (``x * 127.5 + 128``, truncated) gives EDM2's ``uint8(clamp(y, 0, 1) * 255)`` exactly: it is
    ``(255 clamp(y, 0, 1) - 128 + 1e-6) / 127.5`` in float64. The VAE is loaded at the first
    call, so a latent model samples (and fits grids) without it."""

    def __init__(
        self,
        name: str,
        scale: Sequence[float],
        bias: Sequence[float],
        near: str | Path,
        batch_size: int = 8,
    ) -> None:
        super().__init__()
        self.name, self.near, self.batch_size = name, Path(near), int(batch_size)
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32), persistent=False)
        self.register_buffer("bias", torch.tensor(bias, dtype=torch.float32), persistent=False)
        self._vae: nn.Module | None = None

    def vae(self) -> nn.Module:
        if self._vae is None:
            path = find_vae(self.name, self.near)
            if path is None:
                tried = ", ".join(str(p) for p in vae_candidates(self.name, self.near))
                raise ConfigError(
                    f"the model decodes through the VAE {self.name!r}: put its diffusers folder "
                    f"at one of {tried} (or set {ENV}=<folder>)"
                )
            try:
                from diffusers import AutoencoderKL
            except ImportError:
                raise ConfigError(
                    f"decoding through {self.name!r} needs diffusers (pip install diffusers)"
                ) from None
            vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
            self._vae = vae.eval().requires_grad_(False).to(self.scale.device)
        return self._vae

    @torch.no_grad()
    def forward(self, z: Tensor) -> Tensor:
        vae = self.vae().to(z.device)
        x = z.to(torch.float32)
        x = (x - self.bias.reshape(1, -1, 1, 1)) / self.scale.reshape(1, -1, 1, 1)
        y = torch.cat([vae.decode(b).sample for b in x.split(self.batch_size)])
        pixels = y.clamp(0, 1).mul(255)  # EDM2 truncates this to uint8
        return (pixels.double() - 128 + 1e-6) / 127.5
