"""What dl-edit, dl-inpaint and dl-interpolate share: the checkpoint's generator with the configured
sampler and its sigma grid, the input images (by index from the training dataset's split, or from
a folder / npz) and PNG grids."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from diffusionlab.checks import sampler_numbers
from diffusionlab.data.datasets import SPLITS, split_indices
from diffusionlab.diffusion.samplers import Denoise, Sampler
from diffusionlab.errors import ConfigError
from diffusionlab.evaluation.images import load_images
from diffusionlab.sampling.checkpoint import dataset_config, load_module, pick_device
from diffusionlab.sampling.generator import DiffusionGenerator
from diffusionlab.sampling.images import save_samples_png
from diffusionlab.sampling.spec import SamplerSpec

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    """A checkpoint's generator and what the editing methods take from it: the (EMA) denoiser
    ``denoise(x, sigma)`` (no gradients), the configured sampler and its sigma grid
    (``sampler.nfe`` network evaluations from sigma_max to 0)."""

    generator: DiffusionGenerator
    denoise: Denoise
    sampler: Sampler
    sigmas: Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return self.generator.shape

    @property
    def device(self) -> torch.device:
        return self.generator.device


def load_model(cfg: DictConfig) -> TrainedModel:
    """``cfg.ckpt`` on ``cfg.device`` with ``cfg.sampler``, all checked before anything runs.
    Class-conditional models are used unconditionally (the null label, as in label dropout)."""
    sampler_numbers(cfg)
    module = load_module(cfg.ckpt, pick_device(cfg.device))
    if len(module.data_shape) != 3:
        raise ConfigError(f"ckpt={cfg.ckpt!r} is a model of {module.data_shape} points, not images")
    spec = SamplerSpec.from_config(cfg.sampler, ckpt=cfg.ckpt)
    spec.check(module.schedule)
    generator = DiffusionGenerator.from_module(module, spec, use_ema=bool(cfg.use_ema))
    sigmas = spec.sigmas_for(module.schedule, dtype=torch.float32, device=module.device)
    return TrainedModel(generator, torch.no_grad()(generator.denoiser()), spec.sampler(), sigmas)


def input_images(cfg: DictConfig, model: TrainedModel) -> Tensor:
    """Images in [-1, 1] on the model's device: ``inputs.path`` (a folder of images or an npz with
    ``samples`` as sample.py writes it), else ``inputs.indices`` of the ``inputs.split`` split of
    the dataset the checkpoint was trained on (or ``dataset=...``)."""
    x = _from_path(cfg.inputs.path, model.shape) if cfg.inputs.path else _from_dataset(cfg)
    if tuple(x.shape[1:]) != model.shape:
        where = f"inputs.path={cfg.inputs.path!r}" if cfg.inputs.path else "the dataset"
        raise ConfigError(
            f"{where} has images of shape {tuple(x.shape[1:])}; the model takes {model.shape}"
        )
    return x.to(model.device)


def _from_dataset(cfg: DictConfig) -> Tensor:
    indices = OmegaConf.to_container(cfg.inputs.indices) if cfg.inputs.indices else []
    if not indices or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ConfigError(f"inputs.indices={indices!r} must be a non-empty list of integers")
    if cfg.inputs.split not in SPLITS:
        raise ConfigError(f"inputs.split={cfg.inputs.split!r} must be all, train or test")
    data = instantiate(dataset_config(cfg.get("dataset"), cfg.ckpt, cfg.paths))
    split = split_indices(len(data), cfg.inputs.split)
    bad = [i for i in indices if not 0 <= i < len(split)]
    if bad:
        raise ConfigError(
            f"inputs.indices={indices}: {bad} out of range for the {len(split)} images of the "
            f"{cfg.inputs.split!r} split"
        )
    return torch.stack([data[int(split[i])][0] for i in indices]).float()


def _from_path(path: str, shape: tuple[int, ...]) -> Tensor:
    """uint8 images (folder or npz ``samples`` NHWC) -> float [-1, 1] NCHW with the model's channels."""
    p = Path(path).expanduser()
    if p.suffix == ".npz" and p.is_file():
        with np.load(p) as f:
            if "samples" not in f:
                raise ConfigError(f"inputs.path={path!r} has no 'samples' array (NHWC uint8)")
            arr = f["samples"]
        if arr.ndim != 4 or arr.dtype != np.uint8:
            raise ConfigError(f"inputs.path={path!r}: 'samples' must be uint8 NHWC")
        u8 = torch.from_numpy(arr).permute(0, 3, 1, 2)
    else:
        try:
            u8 = load_images(str(p), shape[-1])
        except ConfigError as e:
            raise ConfigError(str(e).replace("images=", "inputs.path=", 1)) from None
    x = u8.float() / 127.5 - 1
    if shape[0] == 1 and x.shape[1] == 3:
        x = x[:, :1]
    return x.contiguous()


def save_grid(rows: Tensor, path: Path, scale: int = 1) -> Path:
    """``rows`` [R, K, C, H, W] in [-1, 1] -> one PNG with R rows of K images, each pixel drawn as
    a ``scale`` x ``scale`` block."""
    r, k = rows.shape[:2]
    save_samples_png(rows.reshape(r * k, *rows.shape[2:]).cpu(), path, nrow=k, scale=scale)
    log.info("wrote %s (%d x %d images)", path, r, k)
    return path


def write_results(path: Path, results: dict) -> Path:
    """The numbers an app measured, as JSON beside its grid."""
    path.write_text(json.dumps(results, indent=2) + "\n")
    log.info("%s", json.dumps(results))
    return path
