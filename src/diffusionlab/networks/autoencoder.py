"""The VAEs of latent diffusion (Rombach et al. 2022, sec. 3.1): our small convolutional KL
autoencoder, a diffusers ``AutoencoderKL`` read from a local folder (the Stable Diffusion VAE of
EDM2's recipe), one loader for both (:func:`load_vae`) and the frozen decoder a latent model
carries (:class:`LatentDecoder`).

Our ``AutoencoderKL`` is latent-diffusion's (encoder -> diagonal Gaussian posterior over a
``C_lat x H/f x W/f`` latent, decoder back to pixels) but smaller, and trained without its
GAN and LPIPS terms (``training/autoencoder.py``). ``f = 2 ** (len(channel_mult) - 1)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffusionlab.errors import CheckpointError, ConfigError
from diffusionlab.files import file_sha256

ARCH_KEYS = ("in_channels", "latent_channels", "channels", "channel_mult", "num_res_blocks")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


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


def load_autoencoder(
    path: str | Path, key: str = "dataset.autoencoder"
) -> tuple[AutoencoderKL, dict]:
    """The autoencoder in ``path`` (eval mode) and the file's contents; ``key`` names the config
    key in messages."""
    p = Path(path).expanduser()
    where = f"{key}={str(path)!r}"
    if not p.is_file():
        raise ConfigError(
            f"{where} does not exist; train one with dl-train-autoencoder (writes "
            "<run>/autoencoder.ckpt)"
        )
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
        if set(ckpt["config"]) != set(ARCH_KEYS):
            raise KeyError("config")
        ae = AutoencoderKL(**ckpt["config"])
        ae.load_state_dict(ckpt["state_dict"])
    except Exception as e:  # any unreadable or foreign file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{where} is not an autoencoder written by dl-train-autoencoder ({first})"
        ) from None
    return ae.eval().requires_grad_(False), ckpt


# ----------------------------------------------------------------------------- diffusers VAEs
def _diffusers_autoencoder() -> type:
    try:
        from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    except ImportError as e:
        raise ConfigError(
            f"a diffusers VAE needs the diffusers package (pip install 'diffusionlab[vae]'): {e}"
        ) from None
    return DiffusersAutoencoderKL


def _plain(config: Any) -> dict:
    """A diffusers config as plain JSON types (it lands in checkpoint hyperparameters)."""
    return json.loads(json.dumps(dict(config)))


def _diffusers_decoder(config: dict) -> nn.Module:
    """A diffusers ``AutoencoderKL`` built from ``config`` without its encoder (random weights
    until loaded): ``decode(z).sample`` is all a latent model needs."""
    vae = _diffusers_autoencoder().from_config(config)
    vae.encoder = None
    vae.quant_conv = None
    return vae.eval().requires_grad_(False)


class Vae:
    """One interface over both VAE kinds: ``encode`` images in [-1, 1] to the posterior's
    ``(mean, std)``; ``record()`` what a :class:`LatentDecoder` needs to decode.

    ``pixel_range`` is the range the network takes its images in: our autoencoder (-1, 1);
    diffusers VAEs by default (0, 1), EDM2's convention (its ``StabilityVAEEncoder`` divides by
    255), so that its latent zips and constants fit; (-1, 1) is the range the SD VAE was trained
    on."""

    def __init__(
        self,
        kind: str,
        model: nn.Module,
        config: dict,
        sha256: str,
        pixel_range: Sequence[float],
        path: str,
    ) -> None:
        self.kind, self.model, self.config, self.sha256 = kind, model, config, sha256
        self.pixel_range = (float(pixel_range[0]), float(pixel_range[1]))
        self.path = path
        if kind == "diffusionlab":
            self.in_channels, self.latent_channels = model.in_channels, model.latent_channels
            self.factor = model.factor
        else:
            self.in_channels = int(config["in_channels"])
            self.latent_channels = int(config["latent_channels"])
            self.factor = 2 ** (len(config["block_out_channels"]) - 1)

    def to_pixels(self, images: Tensor) -> Tensor:
        """uint8 ``[0, 255]`` images -> the network's pixel range (EDM2: ``x / 255``)."""
        lo, hi = self.pixel_range
        if (lo, hi) == (-1.0, 1.0):
            return images.to(torch.float32) / 127.5 - 1.0
        return images.to(torch.float32) / 255.0 * (hi - lo) + lo

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, std)`` of the posterior of images already in ``pixel_range``."""
        if self.kind == "diffusionlab":
            mean, logvar = self.model.encode(pixels)
            return mean, torch.exp(0.5 * logvar)
        dist = self.model.encode(pixels).latent_dist
        return dist.mean, dist.std

    def record(self, scale: Sequence[float], bias: Sequence[float], image_shape: Sequence[int]):
        """The ``latent`` hyperparameters of a model trained on this VAE's latents."""
        return {
            "kind": self.kind,
            "autoencoder": self.config,
            "autoencoder_sha256": self.sha256,
            "scale": [float(s) for s in scale],
            "bias": [float(b) for b in bias],
            "image_shape": [int(s) for s in image_shape],
            "pixel_range": list(self.pixel_range),
        }


def load_vae(path: str | Path, key: str = "vae", pixel_range: Sequence[float] | None = None) -> Vae:
    """Our autoencoder file (``dl-train-autoencoder``) or a diffusers ``AutoencoderKL`` folder
    (``config.json`` + weights, as ``save_pretrained`` writes; read offline)."""
    p = Path(path).expanduser()
    if p.is_file():
        ae, ckpt = load_autoencoder(p, key)
        rng = (-1.0, 1.0) if pixel_range is None else pixel_range
        if tuple(rng) != (-1.0, 1.0):
            raise ConfigError(f"{key}: our autoencoder takes images in [-1, 1], not {list(rng)}")
        config = dict(ckpt["config"], channel_mult=list(ckpt["config"]["channel_mult"]))
        return Vae("diffusionlab", ae, config, file_sha256(p), rng, str(p))
    if p.is_dir() and (p / "config.json").is_file():
        weights = next((p / w for w in DIFFUSERS_WEIGHTS if (p / w).is_file()), None)
        if weights is None:
            raise ConfigError(f"{key}={str(path)!r} holds no {' or '.join(DIFFUSERS_WEIGHTS)}")
        cls = _diffusers_autoencoder()
        try:
            vae = cls.from_pretrained(str(p), local_files_only=True, low_cpu_mem_usage=False)
        except (OSError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{key}={str(path)!r} is not a diffusers AutoencoderKL ({first})"
            ) from None
        rng = (0.0, 1.0) if pixel_range is None else pixel_range
        config = {k: v for k, v in _plain(vae.config).items() if k != "_name_or_path"}
        return Vae(
            "diffusers", vae.eval().requires_grad_(False), config, file_sha256(weights), rng, str(p)
        )
    raise ConfigError(
        f"{key}={str(path)!r} is neither an autoencoder file (dl-train-autoencoder) nor a diffusers "
        "AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors)"
    )


class LatentDecoder(nn.Module):
    """Latents the diffusion model sees -> images in [-1, 1]: undo the per-channel affine map
    ``z = raw * scale + bias`` (EDM2's ``encode_latents``; LDM's ``scale_factor`` with bias 0),
    decode with the VAE, map its ``pixel_range`` to [-1, 1] and clamp (LDM's
    ``decode_first_stage``, EDM2's ``decode``).

    ``autoencoder`` holds the five :class:`AutoencoderKL` arguments (``kind="diffusionlab"``) or a
    diffusers ``AutoencoderKL`` config (``kind="diffusers"``); the weights come from the
    checkpoint's state dict, or :meth:`load_from` a loaded VAE."""

    def __init__(
        self,
        autoencoder: dict,
        scale_factor: float | Sequence[float],
        image_shape: Sequence[int],
        bias: float | Sequence[float] = 0.0,
        kind: str = "diffusionlab",
        pixel_range: Sequence[float] = (-1.0, 1.0),
    ) -> None:
        super().__init__()
        if kind == "diffusionlab":
            cfg = dict(autoencoder, channel_mult=tuple(autoencoder["channel_mult"]))
            self.decoder = Decoder(**cfg)
        elif kind == "diffusers":
            self.vae = _diffusers_decoder(autoencoder)
        else:
            raise CheckpointError(f"latent decoder kind {kind!r} is unknown")
        self.kind = kind
        # not in the state dict: they are hyperparameters, and old checkpoints lack them
        scale = torch.as_tensor(scale_factor, dtype=torch.float32).reshape(-1, 1, 1)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer(
            "bias", torch.as_tensor(bias, dtype=torch.float32).reshape(-1, 1, 1), persistent=False
        )
        self.scale_factor = float(scale.flatten()[0]) if scale.numel() == 1 else None
        self.image_shape = tuple(int(s) for s in image_shape)
        self.pixel_range = (float(pixel_range[0]), float(pixel_range[1]))

    @classmethod
    def from_record(cls, latent: dict) -> LatentDecoder:
        """From a latent model's ``latent`` hyperparameters (``data/latent.py`` records
        ``scale_factor``; ``data/latent_archive.py`` per-channel ``scale`` and ``bias``)."""
        return cls(
            latent["autoencoder"],
            latent["scale"] if "scale" in latent else latent["scale_factor"],
            latent["image_shape"],
            bias=latent.get("bias", 0.0),
            kind=latent.get("kind", "diffusionlab"),
            pixel_range=latent.get("pixel_range", (-1.0, 1.0)),
        )

    def load_from(self, ae: nn.Module | Vae) -> None:
        """Copy the decoder weights of a loaded VAE (ours or diffusers')."""
        model = ae.model if isinstance(ae, Vae) else ae
        if self.kind == "diffusionlab":
            self.decoder.load_state_dict(model.decoder.state_dict())
            return
        own = self.vae.state_dict()
        self.vae.load_state_dict({k: v for k, v in model.state_dict().items() if k in own})

    def forward(self, z: Tensor) -> Tensor:
        raw = (z - self.bias) / self.scale
        x = self.decoder(raw) if self.kind == "diffusionlab" else self.vae.decode(raw).sample
        lo, hi = self.pixel_range
        if (lo, hi) != (-1.0, 1.0):
            x = (x - lo) * (2.0 / (hi - lo)) - 1.0
        return x.clamp(-1.0, 1.0)
