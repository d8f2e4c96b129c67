"""Super-resolution with an image-conditioned model (``cond=image``; SR3, Saharia et al. 2021;
cascaded diffusion, Ho et al. 2021): low-resolution inputs read from files, upsampled through
the one generator with each input's own seed, and the two-stage cascade (a base model's samples
upsampled). ``dl-upsample`` is the app; docs/conditioning.md."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from diffusionlab.errors import ConfigError
from diffusionlab.sampling.conditioning import LowResImages
from diffusionlab.sampling.generator import DiffusionGenerator
from diffusionlab.sampling.images import to_uint8

# the cascade's second stage draws its noise from seed + this (independent of the first stage)
CASCADE_SEED_OFFSET = 1 << 32


def sr_condition(generator: DiffusionGenerator, key: str = "ckpt") -> LowResImages:
    """The generator's image condition; another kind stops with a message naming ``key``."""
    condition = generator.condition
    if not isinstance(condition, LowResImages):
        kind = "unconditional" if condition is None else f"cond={condition.kind}"
        raise ConfigError(
            f"{key}: upsampling needs an image-conditioned (super-resolution) checkpoint, "
            f"trained with cond=image (experiment=sr_mnist); this one is {kind}"
        )
    return condition


def input_shape(generator: DiffusionGenerator) -> tuple[int, int, int]:
    """The low-resolution image shape the model upsamples from: its data shape / factor."""
    c, h, w = generator.shape
    f = sr_condition(generator).settings.factor
    return c, h // f, w // f


def read_inputs(path: str, shape: Sequence[int], key: str = "inputs") -> Tensor:
    """Low-resolution images from a folder or zip of images (sorted by name) or an ``.npz``
    with ``samples`` (sample.py's, uint8 NHWC), as float NCHW in [-1, 1]; they must have the
    model's input ``shape`` (channels, size)."""
    p = Path(str(path)).expanduser()
    if p.suffix.lower() == ".npz":
        try:
            with np.load(p, allow_pickle=False) as f:
                arr = f["samples"]
        except (OSError, KeyError, ValueError) as e:
            raise ConfigError(f"{key}={str(path)!r}: not an npz with 'samples' ({e})") from None
        if arr.ndim != 4 or arr.dtype != np.uint8:
            raise ConfigError(
                f"{key}={str(path)!r}: 'samples' must be uint8 [N, H, W, C], got {arr.dtype} "
                f"{list(arr.shape)}"
            )
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1
    else:
        from diffusionlab.data.image_archive import ImageArchive

        try:
            data = ImageArchive(str(path), channels=int(shape[0]))
        except ConfigError as e:
            raise ConfigError(str(e).replace("dataset.path", key).replace("dataset.", "")) from None
        x = data.images[:]
    if tuple(x.shape[1:]) != tuple(shape):
        c, h, w = shape
        raise ConfigError(
            f"{key}={str(path)!r} holds {x.shape[1]}-channel {x.shape[2]}x{x.shape[3]} images; "
            f"the model upsamples {c}-channel {h}x{w} images"
        )
    return x


@torch.no_grad()
def upsample(
    generator: DiffusionGenerator,
    images: Tensor,
    seeds: Sequence[int],
    batch_size: int = 64,
    progress: bool = True,
) -> Tensor:
    """One upsampled image per low-resolution input, input ``i`` with ``seeds[i]`` (noise and
    augmentation from that seed only, so batching does not change results); [-1, 1], CPU."""
    if len(seeds) != images.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {images.shape[0]} inputs")
    seeds = list(seeds)
    out = []
    starts = range(0, len(seeds), batch_size)
    for start in tqdm(starts, desc="upsampling", unit="batch", disable=not progress):
        batch = seeds[start : start + batch_size]
        low = images[start : start + batch_size].to(generator.device)
        noise, values, gen = generator.seeded_inputs(batch, low)
        out.append(generator.sample_images(noise, values, gen).cpu())
    return torch.cat(out)


@torch.no_grad()
def generate_base(
    generator: DiffusionGenerator, seeds: Sequence[int], batch_size: int = 64
) -> Tensor:
    """The cascade's first stage: one sample of the base model per seed, [-1, 1], CPU, quantised
    to 8 bits as a saved image would be."""
    seeds = list(seeds)
    out = []
    for start in tqdm(range(0, len(seeds), batch_size), desc="base model", unit="batch"):
        out.append(generator.generate(seeds[start : start + batch_size]).cpu())
    return to_uint8(torch.cat(out)).float() / 127.5 - 1


def check_base(base: DiffusionGenerator, sr: DiffusionGenerator) -> None:
    """The base model must generate what the upsampler takes."""
    if tuple(base.shape) != input_shape(sr):
        raise ConfigError(
            f"base_ckpt generates {list(base.shape)} samples but ckpt upsamples "
            f"{list(input_shape(sr))} images"
        )
