"""The training app's REPA setup (``repa=domain`` / ``repa=dinov2``, training/repa.py): the
encoder's weights resolved (the dataset's domain classifier is trained on first use), the
encoder built once to learn its token width, all before the model is built."""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig, OmegaConf

from diffusionlab.errors import ConfigError
from diffusionlab.evaluation.evaluator import dataset_key
from diffusionlab.evaluation.extractors import domain_weights_path
from diffusionlab.evaluation.train_extractor import train_and_save
from diffusionlab.networks.encoders import PatchEncoder
from diffusionlab.training.repa import RepaSettings, make_encoder

log = logging.getLogger(__name__)


def repa_config(cfg: DictConfig, dataset) -> tuple[dict, PatchEncoder] | None:
    """The resolved ``repa`` node (encoder weights, ``encoder_dim``) and its encoder, or None
    when REPA is off. Nothing here draws from the process RNG (the model's initialisation is
    the same with and without REPA)."""
    node = cfg.get("repa")
    if not node:
        return None
    config = OmegaConf.to_container(node, resolve=True)
    RepaSettings.from_dict(config)  # every setting checked before anything is built
    if getattr(dataset, "latent", None) is not None:
        raise ConfigError(
            "repa: the encoder sees the clean image, and dataset=latents yields latents; "
            "train REPA on a pixel dataset"
        )
    encoder_cfg = dict(config["encoder"])
    with torch.random.fork_rng(devices=[]):
        if encoder_cfg.get("name") == "domain" and not encoder_cfg.get("weights"):
            encoder_cfg["weights"] = str(domain_weights(cfg, dataset))
        encoder = make_encoder(encoder_cfg, tuple(dataset.shape))
    config["encoder"] = encoder_cfg
    config["encoder_dim"] = int(encoder.dim)
    return config, encoder


def domain_weights(cfg: DictConfig, dataset):
    """The dataset's domain classifier file in ``paths.cache_dir`` (what evaluate.py's domain
    extractor uses), trained now when missing."""
    images = getattr(dataset, "images", None)
    if not isinstance(images, torch.Tensor):
        raise ConfigError(
            "repa.encoder.name=domain trains a classifier on an in-memory labelled dataset "
            "(mnist, digits); pass repa.encoder.weights=<file> or use repa=dinov2"
        )
    name = dataset_key(cfg.dataset._target_, cfg.dataset.get("path"))
    path = domain_weights_path(cfg.paths.cache_dir, name, int(images.shape[-1]))
    if not path.is_file():
        log.info("repa: training the domain classifier -> %s", path)
        train_and_save(dataset, name, cfg.paths.cache_dir)
    return path
