"""A small convolutional KL autoencoder for latent diffusion (Rombach et al. 2022, sec. 3.1).

As latent-diffusion's ``AutoencoderKL`` (encoder -> diagonal Gaussian posterior over a
``C_lat x H/f x W/f`` latent, decoder back to pixels) but smaller, and trained without its
GAN and LPIPS terms (``training/autoencoder.py``). ``f = 2 ** (len(channel_mult) - 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a skip (1x1 conv where the width changes)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(cin),
            nn.SiLU(),
            nn.Conv2d(cin, cout, 3, padding=1),
            _norm(cout),
            nn.SiLU(),
            nn.Conv2d(cout, cout, 3, padding=1),
        )
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


class Encoder(nn.Module):
    """Image ``[B, C, H, W]`` -> posterior (mean, logvar), each ``[B, C_lat, H/f, W/f]``."""

    def __init__(
        self,
        in_channels: int,
        latent_channels: int,
        channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
    ) -> None:
        super().__init__()
        widths = [channels * m for m in channel_mult]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
        cin = widths[0]
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(cin, width))
                cin = width
            if level < len(widths) - 1:
                layers.append(nn.Conv2d(cin, cin, 3, stride=2, padding=1))
        layers += [ResBlock(cin, cin), _norm(cin), nn.SiLU()]
        layers.append(nn.Conv2d(cin, 2 * latent_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self.net(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # as latent-diffusion's DiagonalGaussian


class Decoder(nn.Module):
    """Latent ``[B, C_lat, h, w]`` -> image ``[B, C, h*f, w*f]`` (unbounded; [-1, 1] after training)."""

    def __init__(
        self,
        in_channels: int,
        latent_channels: int,
        channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
    ) -> None:
        super().__init__()
        widths = [channels * m for m in channel_mult][::-1]
        cin = widths[0]
        layers: list[nn.Module] = [
            nn.Conv2d(latent_channels, cin, 3, padding=1),
            ResBlock(cin, cin),
        ]
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(cin, width))
                cin = width
            if level < len(widths) - 1:
                layers += [nn.Upsample(scale_factor=2.0), nn.Conv2d(cin, cin, 3, padding=1)]
        layers += [_norm(cin), nn.SiLU(), nn.Conv2d(cin, in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class AutoencoderKL(nn.Module):
    """Encoder + decoder; ``forward(x, noise)`` returns (reconstruction, mean, logvar) with the
    latent drawn by reparameterisation ``z = mean + exp(logvar / 2) * noise``."""

    def __init__(
        self,
        in_channels: int = 1,
        latent_channels: int = 4,
        channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
    ) -> None:
        super().__init__()
        kw = dict(
            in_channels=in_channels,
            latent_channels=latent_channels,
            channels=channels,
            channel_mult=tuple(channel_mult),
            num_res_blocks=num_res_blocks,
        )
        self.encoder = Encoder(**kw)
        self.decoder = Decoder(**kw)
        self.config = dict(kw, channel_mult=list(channel_mult))  # what rebuilds it
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.factor = 2 ** (len(channel_mult) - 1)

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        """``(C_lat, H/f, W/f)`` of images ``(C, H, W)``."""
        _, h, w = image_shape
        return (self.latent_channels, h // self.factor, w // self.factor)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        mean, logvar = self.encode(x)
        noise = torch.randn_like(mean) if noise is None else noise
        z = mean + torch.exp(0.5 * logvar) * noise
        return self.decode(z), mean, logvar


class LatentDecoder(nn.Module):
    """Scaled latents -> images in [-1, 1]: ``clamp(decode(z / scale_factor))`` (LDM's
    ``decode_first_stage``). ``autoencoder`` holds the five :class:`AutoencoderKL` arguments."""

    def __init__(self, autoencoder: dict, scale_factor: float, image_shape: Sequence[int]) -> None:
        super().__init__()
        cfg = dict(autoencoder, channel_mult=tuple(autoencoder["channel_mult"]))
        self.decoder = Decoder(**cfg)
        self.scale_factor = float(scale_factor)
        self.image_shape = tuple(int(s) for s in image_shape)

    def load_from(self, ae: AutoencoderKL) -> None:
        """Copy the decoder weights of a trained autoencoder."""
        self.decoder.load_state_dict(ae.decoder.state_dict())

    def forward(self, z: Tensor) -> Tensor:
        return self.decoder(z / self.scale_factor).clamp(-1.0, 1.0)
