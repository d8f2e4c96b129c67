"""``dl-dataset convert|encode key=value ...``: datasets in NVlabs' format (EDM2's
``dataset_tool.py``): ``convert`` an image folder, zip or the CIFAR-10 tarball to a dataset zip
(or folder, or LitData chunks), ``encode`` images to VAE latent statistics (docs/data.md)."""

from __future__ import annotations

import json
import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from diffusionlab.checks import number
from diffusionlab.cli.common import run_cli, user_errors_exit
from diffusionlab.config import CONF_DIR
from diffusionlab.errors import ConfigError

log = logging.getLogger(__name__)

COMMANDS = ("convert", "encode")


def _workers(cfg: DictConfig) -> int:
    from diffusionlab.data.convert import default_workers

    if cfg.num_workers == "auto":
        return default_workers()
    return int(number(cfg, "num_workers", int, at_least=0))


def run(cfg: DictConfig) -> dict:
    """Run ``cfg.command``; returns its summary (also logged as one JSON line)."""
    if cfg.command not in COMMANDS:
        raise ConfigError(f"command={cfg.command!r}: choose one of {COMMANDS}")
    if cfg.max_images is not None:
        number(cfg, "max_images", int, at_least=1)
    if cfg.command == "convert":
        from diffusionlab.data.convert import convert

        summary = convert(
            str(cfg.source),
            str(cfg.dest),
            resolution=cfg.resolution,
            transform=cfg.transform,
            channels=int(number(cfg, "channels", int)),
            max_images=cfg.max_images,
            skip_corrupt=bool(cfg.skip_corrupt),
            format=cfg.format,
            num_workers=_workers(cfg),
            chunk_bytes=str(cfg.chunk_bytes),
            shuffle=cfg.shuffle,
            seed=int(number(cfg, "seed", int, at_least=0)),
            progress=bool(cfg.progress),
        )
    else:
        from diffusionlab.data.encode import encode

        if not cfg.vae:
            raise ConfigError(
                "vae: a value is required (an autoencoder file from dl-train-autoencoder, or a "
                "diffusers AutoencoderKL folder)"
            )
        pixel_range = OmegaConf.to_container(cfg.pixel_range) if cfg.pixel_range else None
        summary = encode(
            str(cfg.source),
            str(cfg.dest),
            str(cfg.vae),
            batch_size=int(number(cfg, "batch_size", int, at_least=1)),
            device=str(cfg.device),
            pixel_range=pixel_range,
            max_images=cfg.max_images,
            skip_corrupt=bool(cfg.skip_corrupt),
            num_workers=_workers(cfg),
            progress=bool(cfg.progress),
        )
    log.info("%s", json.dumps(summary))
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="dataset_tool")
@user_errors_exit
def app(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """``dl-dataset <command> key=value ...``: the command word becomes ``command=<word>``."""
    args = sys.argv[1:]
    if args and args[0] in COMMANDS:
        sys.argv = [sys.argv[0], *args[1:], f"command={args[0]}"]
    elif not any(a.startswith(("command=", "-")) for a in args):  # -h, --cfg job: Hydra's
        sys.exit(f"usage: dl-dataset {{{'|'.join(COMMANDS)}}} source=... dest=... [key=value ...]")
    run_cli(app, "dataset_tool")


if __name__ == "__main__":
    main()
