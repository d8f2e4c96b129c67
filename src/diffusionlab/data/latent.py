"""Latent datasets (Rombach et al. 2022): a source image dataset encoded once by a trained KL
autoencoder, cached on disk, and served as scaled latents so every config group trains on them
unchanged.

The cached latents are the posterior means (deterministic, so the cache is exact; LDM instead
draws one posterior sample each time it encodes). They are served multiplied by
``scale_factor = 1 / std(latents)`` (LDM's ``scale_factor``, computed here over the whole
dataset), so the diffusion model sees unit-variance data as the EDM defaults assume.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from diffusionlab.data.datasets import TensorImageDataset
from diffusionlab.errors import ConfigError
from diffusionlab.files import atomic_write, file_sha256
from diffusionlab.networks.autoencoder import AutoencoderKL, load_autoencoder

log = logging.getLogger(__name__)


class LatentDataset(TensorImageDataset):
    """Scaled latents as ``images``; ``source`` is the image dataset they encode, ``autoencoder``
    the model that encoded them and ``latent`` what a latent checkpoint records to decode."""

    def __init__(
        self,
        latents: Tensor,
        labels: Tensor | None,
        num_classes: int,
        source: TensorImageDataset,
        autoencoder: AutoencoderKL,
        latent: dict[str, Any],
    ) -> None:
        super().__init__(latents, labels, num_classes)
        self.source = source
        self.autoencoder = autoencoder
        self.latent = latent


@torch.no_grad()
def encode_images(ae: AutoencoderKL, images: Tensor, batch_size: int = 256) -> Tensor:
    """Posterior means of ``images`` in [-1, 1]."""
    return torch.cat(
        [ae.encode(images[i : i + batch_size])[0] for i in range(0, len(images), batch_size)]
    )


def tensor_sha256(*tensors: Tensor | None) -> str:
    """A fingerprint of the source data (images and labels)."""
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_path(cache_dir: str | Path, source: dict, ae_sha: str) -> Path:
    """``<cache_dir>/latents/<source>-<hash of its config>-<autoencoder hash>.pt``."""
    name = str(source.get("_target_", "dataset")).rsplit(".", 1)[-1]
    cfg_sha = hashlib.sha1(json.dumps(source, sort_keys=True).encode()).hexdigest()[:8]
    return Path(cache_dir) / "latents" / f"{name}-{cfg_sha}-{ae_sha[:12]}.pt"


def cached_latents(path: Path, ae: AutoencoderKL, ae_sha: str, data: TensorImageDataset) -> Tensor:
    """The latents in ``path`` when it was written by this autoencoder for these exact images;
    otherwise (absent, or stale: the data changed under the same config) encode and write it."""
    data_sha = tensor_sha256(data.images, data.labels)
    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("autoencoder_sha256") == ae_sha and cached.get("data_sha256") == data_sha:
            log.info("latents read from cache %s", path)
            return cached["latents"]
        log.warning("stale latent cache %s (other data or autoencoder): encoding again", path)
    latents = encode_images(ae, data.images)
    record = {"latents": latents, "autoencoder_sha256": ae_sha, "data_sha256": data_sha}
    atomic_write(path, lambda f: torch.save(record, f))
    log.info("encoded %d images -> %s", len(latents), path)
    return latents


def latent(
    autoencoder: str,
    source: DictConfig | dict,
    cache_dir: str,
    channels: int,
    resolution: int,
    num_classes: int = 0,
) -> LatentDataset:
    """The ``source`` dataset (a dataset config) encoded by the autoencoder file ``autoencoder``.

    ``channels`` and ``resolution`` (what the model configs read) must equal the latents' shape."""
    ae, _ = load_autoencoder(autoencoder)
    ae_sha = file_sha256(autoencoder)
    source_cfg = (
        OmegaConf.to_container(source, resolve=True)
        if OmegaConf.is_config(source)
        else dict(source)
    )
    data = instantiate(source_cfg)
    images = getattr(data, "images", None)
    if images is None or images.ndim != 4:
        raise ConfigError(f"dataset.source={source_cfg.get('_target_')} is not an image dataset")
    image_shape = tuple(images.shape[1:])
    if image_shape[0] != ae.in_channels or any(s % ae.factor for s in image_shape[1:]):
        raise ConfigError(
            f"dataset.source images are {'x'.join(map(str, image_shape))} but the autoencoder "
            f"dataset.autoencoder={autoencoder!r} takes {ae.in_channels} channels and sizes "
            f"divisible by {ae.factor}"
        )
    shape = ae.latent_shape(image_shape)
    if (channels, resolution, resolution) != shape:
        raise ConfigError(
            f"dataset.channels={channels}, dataset.resolution={resolution} do not match the "
            f"latents {'x'.join(map(str, shape))} of dataset.autoencoder={autoencoder!r}; "
            f"set dataset.channels={shape[0]} dataset.resolution={shape[1]}"
        )
    latents = cached_latents(cache_path(cache_dir, source_cfg, ae_sha), ae, ae_sha, data)
    scale_factor = 1.0 / float(latents.std())
    record = {
        "autoencoder": dict(ae.config),
        "scale_factor": scale_factor,
        "image_shape": list(image_shape),
        "autoencoder_sha256": ae_sha,
    }
    labels = data.labels if num_classes else None
    return LatentDataset(latents * scale_factor, labels, num_classes, data, ae, record)
