"""``dl-train-autoencoder dataset=mnist``: train the KL autoencoder of latent diffusion on a dataset
and write ``<run>/autoencoder.ckpt`` (the latent dataset ``dataset=latent`` encodes with it)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusionlab.checks import number
from diffusionlab.cli.common import run_cli, user_errors_exit
from diffusionlab.config import CONF_DIR
from diffusionlab.errors import ConfigError
from diffusionlab.networks.autoencoder import AutoencoderKL
from diffusionlab.training.autoencoder import (
    reconstruction_mse,
    save_autoencoder,
    split_held_out,
    train_autoencoder,
)

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Train, report the held-out reconstruction MSE, save; returns the summary it writes to
    ``<run>/autoencoder.json``."""
    for key in ("max_steps", "batch_size"):
        number(cfg, key, int, at_least=1)
    number(cfg, "lr", above=0)
    number(cfg, "loss.kl_weight", at_least=0)
    max_seconds = number(cfg, "max_seconds", above=0, optional=True)
    held_out = number(cfg, "held_out", above=0)
    if held_out >= 1:
        raise ConfigError(f"held_out={held_out} must be below 1")
    torch.manual_seed(int(cfg.seed))
    data = instantiate(cfg.dataset)
    images = getattr(data, "images", None)
    if images is None or images.ndim != 4:
        raise ConfigError(f"dataset={cfg.dataset._target_} is not an image dataset")
    config = OmegaConf.to_container(cfg.autoencoder, resolve=True)
    ae = AutoencoderKL(**config)
    if any(s % ae.factor for s in images.shape[-2:]):
        raise ConfigError(
            f"dataset.resolution={images.shape[-1]} is not divisible by the autoencoder's "
            f"downsampling factor {ae.factor} (autoencoder.channel_mult)"
        )
    train_idx, held_idx = split_held_out(images.shape[0], held_out, int(cfg.seed))
    result = train_autoencoder(
        ae,
        images[train_idx],
        steps=int(cfg.max_steps),
        batch_size=int(cfg.batch_size),
        lr=float(cfg.lr),
        kl_weight=float(cfg.loss.kl_weight),
        recon=str(cfg.loss.recon),
        seed=int(cfg.seed),
        max_seconds=max_seconds,
        log_every=int(cfg.log_every),
    )
    result["held_out_mse"] = reconstruction_mse(ae, images[held_idx])
    result["latent_shape"] = list(ae.latent_shape(images.shape[1:]))
    result["image_shape"] = list(images.shape[1:])
    out = Path(cfg.paths.output_dir)
    meta = {
        "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
        "loss": OmegaConf.to_container(cfg.loss, resolve=True),
        **result,
    }
    save_autoencoder(out / "autoencoder.ckpt", ae, config, meta)
    (out / "autoencoder.json").write_text(json.dumps(meta, indent=2))
    log.info(
        "%d steps in %.0f s; held-out reconstruction MSE %.4f; latents %s -> %s",
        result["steps"],
        result["seconds"],
        result["held_out_mse"],
        result["latent_shape"],
        out / "autoencoder.ckpt",
    )
    return meta


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train_autoencoder")
@user_errors_exit
def app(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """``dl-train-autoencoder``: user errors end as one ``error: ...`` line."""
    run_cli(app, "train_autoencoder")


if __name__ == "__main__":
    main()
