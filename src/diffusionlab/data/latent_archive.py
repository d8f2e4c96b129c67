"""``dataset=latents``: VAE latent statistics in EDM2's format (``dl-dataset encode``, or EDM2's
own ``dataset_tool.py encode``), read per sample, one latent drawn per sample from its own seed.

A member ``img-mean-std-*.npy`` is the posterior's ``[mean; std]`` (``2C x h x w``). Each time a
sample is read the latent is drawn as ``mean + std * n`` with ``n`` from the sample's seed (the
seed the batch already carries, in a stream of its own), then normalised per channel as EDM2's
``StabilityVAEEncoder.encode_latents``: ``z = (raw - raw_mean) / raw_std * final_std +
final_mean``. ``raw_mean`` / ``raw_std`` come from the config, else from ``dataset.json``
(written by ``dl-dataset encode``), else EDM2's constants for the Stable Diffusion VAE (a zip
without our record was made by EDM2's tool). The decoder (``dataset.vae``) rides in the
checkpoint (``networks/autoencoder.LatentDecoder``), so sample grids, ``sample.py``,
``evaluate.py`` and the editing apps see images.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from diffusionlab.data.archive import CorruptFile, FileIndex
from diffusionlab.data.encode import METADATA_KEY
from diffusionlab.data.lazy import LazyDataset
from diffusionlab.data.sampler import sample_seed
from diffusionlab.diffusion.noise import StackedRandomGenerator
from diffusionlab.errors import ConfigError
from diffusionlab.networks.autoencoder import load_vae

log = logging.getLogger(__name__)

# the stream of a training sample's latent draw (data/sampler.py holds streams 0-3)
LATENT_STREAM = 4
# EDM2 training/encoders.py StabilityVAEEncoder: stabilityai/sd-vae-ft-mse, images in [0, 1]
EDM2_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
EDM2_RAW_STD = (4.17, 4.62, 3.71, 3.28)
EDM2_PIXEL_RANGE = (0.0, 1.0)


def latent_seeds(noise_seeds: Sequence[int]) -> list[int]:
    """Each training sample's latent-draw seed, a stream apart from its noise seed."""
    return [sample_seed(int(s), 0, LATENT_STREAM) for s in noise_seeds]


def read_npy(data: bytes) -> np.ndarray:
    try:
        return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CorruptFile(f"is not a readable .npy array ({e})") from None


class LatentArchive(LazyDataset):
    """Latent statistics ``[mean; std]`` of a zip or folder; ``vae`` the VAE that made them (our
    autoencoder file or a diffusers folder), ``source`` the config of the image dataset they
    encode (what evaluation compares samples with; optional for training)."""

    def __init__(
        self,
        path: str,
        vae: str,
        resolution: int | None = None,
        channels: int | None = None,
        num_classes: int | None = None,
        raw_mean: Sequence[float] | None = None,
        raw_std: Sequence[float] | None = None,
        final_mean: float = 0.0,
        final_std: float = 0.5,
        source: DictConfig | dict | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        self.index = FileIndex(path, (".npy",))
        self.skip_corrupt = skip_corrupt
        meta = self._metadata()
        self.autoencoder = load_vae(vae, "dataset.vae", meta.get("pixel_range", EDM2_PIXEL_RANGE))
        recorded = (meta.get("vae") or {}).get("sha256")
        if recorded and recorded != self.autoencoder.sha256:
            raise ConfigError(
                f"dataset.path={path!r} was encoded by another VAE ({meta['vae'].get('path')!r}, "
                f"sha256 {recorded[:12]}...) than dataset.vae={vae!r} "
                f"(sha256 {self.autoencoder.sha256[:12]}...)"
            )
        first = self._load_checked(0)
        c2, h, w = first.shape
        c = c2 // 2
        if c != self.autoencoder.latent_channels or c2 % 2:
            raise ConfigError(
                f"dataset.path={path!r} holds {c2}-channel arrays ({self.index.names[0]!r}); the "
                f"VAE dataset.vae={vae!r} has {self.autoencoder.latent_channels} latent channels "
                "(an encoded member is [mean; std], twice that)"
            )
        for key, want, have in (("channels", channels, c), ("resolution", resolution, h)):
            if want is not None and int(want) != have:
                raise ConfigError(
                    f"dataset.{key}={want} but the latents of dataset.path={path!r} are "
                    f"{c}x{h}x{w}; the model is built for dataset.{key}: leave it unset (null)"
                )
        self.shape = (c, h, w)
        mean = raw_mean if raw_mean is not None else meta.get("raw_mean")
        std = raw_std if raw_std is not None else meta.get("raw_std")
        if mean is None or std is None:
            if c != len(EDM2_RAW_MEAN):
                raise ConfigError(
                    f"dataset.path={path!r} records no latent statistics; set dataset.raw_mean "
                    f"and dataset.raw_std ({c} values each)"
                )
            log.info("latent statistics: EDM2's Stable Diffusion VAE constants")
            mean = EDM2_RAW_MEAN if mean is None else mean
            std = EDM2_RAW_STD if std is None else std
        mean = np.asarray(list(mean), np.float32)
        std = np.asarray(list(std), np.float32)
        if mean.shape != (c,) or std.shape != (c,) or (std <= 0).any():
            raise ConfigError(
                f"dataset.raw_mean / dataset.raw_std need {c} values (std > 0), got "
                f"{mean.tolist()} / {std.tolist()}"
            )
        # EDM2: scale = final_std / raw_std, bias = final_mean - raw_mean * scale
        self.scale = np.float32(final_std) / std
        self.bias = np.float32(final_mean) - mean * self.scale
        self.label_array = None if num_classes == 0 else self.index.labels(num_classes)
        if num_classes and self.label_array is None:
            raise ConfigError(f"dataset.num_classes={num_classes} but {path!r} has no labels")
        self.num_classes = (
            int(num_classes)
            if num_classes is not None
            else (0 if self.label_array is None else int(self.label_array.max()) + 1)
        )
        image_shape = meta.get("image_shape") or [
            self.autoencoder.in_channels,
            h * self.autoencoder.factor,
            w * self.autoencoder.factor,
        ]
        self.latent = self.autoencoder.record(self.scale, self.bias, image_shape)
        self._source = source

    def _metadata(self) -> dict[str, Any]:
        if self.index.metadata_bytes is None:
            return {}
        try:
            return json.loads(self.index.metadata_bytes).get(METADATA_KEY) or {}
        except (ValueError, AttributeError):
            return {}

    def _load_checked(self, i: int) -> np.ndarray:
        try:
            arr = read_npy(self.index.read(i))
        except CorruptFile as e:
            raise ConfigError(f"{self.index.where(i)} {e}") from None
        if arr.ndim != 3 or arr.dtype != np.float32:
            raise ConfigError(
                f"{self.index.where(i)} is a {arr.dtype} array of shape {arr.shape}; EDM2's "
                "latents are float32 [2C, h, w] (dl-dataset encode)"
            )
        return arr

    def __getstate__(self) -> dict:
        return dict(self.__dict__, autoencoder=None)  # workers read arrays, not the VAE

    def __len__(self) -> int:
        return len(self.index)

    @property
    def source(self) -> Any:
        """The image dataset the latents encode (``dataset.source``), for evaluation."""
        cfg = self._source
        if cfg is None or not (cfg.get("path") if hasattr(cfg, "get") else None):
            raise ConfigError(
                "dataset.source.path: the images the latents encode are needed to compare "
                "samples with them (FID); set dataset.source.path=<the image zip>"
            )
        plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
        return instantiate(plain)

    def load(self, i: int) -> tuple[Tensor, int]:
        data = self.index.read(i)
        try:
            arr = read_npy(data)
        except CorruptFile as e:
            raise CorruptFile(f"{self.index.where(i)} {e}") from None
        if arr.shape != (2 * self.shape[0], *self.shape[1:]):
            raise ConfigError(
                f"{self.index.where(i)} has shape {arr.shape}, the first member "
                f"{(2 * self.shape[0], *self.shape[1:])}"
            )
        return torch.from_numpy(arr), self.label(i)

    def prepare_batch(self, x: Tensor, seeds: Tensor) -> Tensor:
        """``[mean; std]`` -> normalised latents, each drawn from its sample's own seed."""
        mean, std = x.float().chunk(2, dim=1)
        noise = StackedRandomGenerator(latent_seeds(seeds.tolist())).randn(mean.shape)
        scale = torch.from_numpy(self.scale).reshape(1, -1, 1, 1)
        bias = torch.from_numpy(self.bias).reshape(1, -1, 1, 1)
        return (mean + std * noise) * scale + bias

    def finish_batch(self, x: Tensor) -> Tensor:
        return x

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        """Sample ``i`` with the latent at the posterior mean (no draw), normalised."""
        x, label = self.raw_item(i)
        mean = x.chunk(2, dim=0)[0]
        scale = torch.from_numpy(self.scale).reshape(-1, 1, 1)
        return mean * scale + torch.from_numpy(self.bias).reshape(-1, 1, 1), label
