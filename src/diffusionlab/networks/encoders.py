"""Frozen image encoders whose patch features a denoiser is aligned to (REPA, training/repa.py),
and the small digit classifier that is also the offline FID extractor (evaluation/extractors.py).

An encoder maps clean images (float NCHW in [-1, 1], the data's channels and resolution) to
patch tokens ``[B, h*w, dim]`` on a ``grid`` of ``h x w``; it has no randomness and no gradient.

- ``domain``: the digit classifier trained on the dataset (the project's MNIST / digits feature
  extractor); its tokens are a conv stage's feature map (stage 2: half the resolution, 64-d).
- ``dinov2``: DINOv2 from a local weights file (networks/dinov2.py); images resized bicubically to
  ``resolution`` (REPA: 224 per 256 px) and ImageNet-normalised, tokens = normalised patch tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusionlab.errors import ConfigError
from diffusionlab.networks.dinov2 import load_dinov2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def adapt_images(x: Tensor, channels: int, resolution: int) -> Tensor:
    """Float NCHW images to ``channels`` (grey <-> RGB by mean / repeat) and ``resolution``
    (area when shrinking, bilinear when growing)."""
    if x.shape[1] == 3 and channels == 1:
        x = x.mean(1, keepdim=True)
    elif x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != resolution:
        mode = "area" if x.shape[-1] > resolution else "bilinear"
        x = F.interpolate(x, size=(resolution, resolution), mode=mode)
    return x


class DomainClassifier(nn.Module):
    """A small CNN for grey digits: three conv stages, global pooling, a 128-d feature layer."""

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 32, dim: int = 128
    ):
        super().__init__()
        self.config = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "width": width,
            "dim": dim,
        }
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * w, dim),
            nn.SiLU(),
        )
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` float NCHW in [-1, 1] -> (features [B, dim], logits [B, num_classes])."""
        h = self.body(x)
        return h, self.head(h)

    def stage(self, x: Tensor, stage: int) -> Tensor:
        """The feature map after conv stage 1 (full resolution), 2 (half) or 3 (quarter)."""
        return self.body[: 2 * stage](x)


class PatchEncoder(nn.Module):
    """A frozen encoder: clean images -> patch tokens ``[B, h*w, dim]`` on ``grid`` (h, w)."""

    dim: int
    grid: tuple[int, int]

    def frozen(self) -> PatchEncoder:
        return self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> PatchEncoder:
        return super().train(False)  # always in eval mode: no dropout, fixed statistics


class DomainEncoder(PatchEncoder):
    """The digit classifier's conv ``stage`` (1, 2 or 3) as tokens, from its weights file (the
    domain feature extractor's cache file)."""

    def __init__(self, weights: str, stage: int = 2) -> None:
        super().__init__()
        if stage not in (1, 2, 3):
            raise ConfigError(f"repa.encoder.stage={stage} must be 1, 2 or 3")
        try:
            ckpt = torch.load(weights, map_location="cpu", weights_only=True)
            net = DomainClassifier(**ckpt["config"])
            net.load_state_dict(ckpt["state_dict"])
        except Exception as e:
            raise ConfigError(
                f"repa.encoder.weights={str(weights)!r}: not a domain classifier file "
                f"({type(e).__name__}); train it with dl-train-extractor"
            ) from None
        self.net, self.stage_index = net, stage
        self.resolution = int(ckpt["resolution"])
        self.channels = int(ckpt["config"]["in_channels"])
        self.dim = 2 * int(ckpt["config"]["width"]) if stage > 1 else int(ckpt["config"]["width"])
        side = self.resolution
        for _ in range(stage - 1):
            side = (side - 1) // 2 + 1  # stride-2 3x3 convs with padding 1
        self.grid = (side, side)
        self.frozen()

    def forward(self, x: Tensor) -> Tensor:
        x = adapt_images(x.float(), self.channels, self.resolution)
        return self.net.stage(x, self.stage_index).flatten(2).transpose(1, 2)


class DINOv2Encoder(PatchEncoder):
    """DINOv2's normalised patch tokens of images resized (bicubic) to ``resolution``, a
    multiple of 14 (REPA: 224 for 256 px images)."""

    def __init__(self, weights: str | None, resolution: int = 224) -> None:
        super().__init__()
        self.net = load_dinov2(weights, "repa.encoder.weights")
        if resolution % self.net.patch:
            raise ConfigError(
                f"repa.encoder.resolution={resolution} must be a multiple of {self.net.patch}"
            )
        self.resolution = int(resolution)
        self.dim = self.net.dim
        side = resolution // self.net.patch
        self.grid = (side, side)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.frozen()

    def forward(self, x: Tensor) -> Tensor:
        x = (x.float() + 1) / 2
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]
        size = (self.resolution, self.resolution)
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        return self.net.features((x - self.mean) / self.std)[1]


ENCODERS = ("domain", "dinov2")


def build_encoder(config: Mapping[str, Any], image_shape: tuple[int, ...]) -> PatchEncoder:
    """The encoder of a ``repa.encoder`` config: ``name`` (domain | dinov2), ``weights`` (a local
    file) and its options (``stage``; ``resolution``, null = 224 per 256 px of ``image_shape``)."""
    name = config.get("name")
    if name == "domain":
        return DomainEncoder(str(config.get("weights")), int(config.get("stage", 2)))
    if name == "dinov2":
        res = config.get("resolution")
        if res is None:
            res = 224 * max(1, int(image_shape[-1]) // 256)
        return DINOv2Encoder(config.get("weights"), int(res))
    raise ConfigError(f"repa.encoder.name={name!r}: use one of {list(ENCODERS)}")
