"""``dl-export ckpt=<run>/checkpoints/last.ckpt dest=<folder>``: a self-contained model folder
(safetensors weights, resolved config, model card) that loads without Lightning."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from diffusionlab.cli.common import run_cli, user_errors_exit
from diffusionlab.config import CONF_DIR
from diffusionlab.errors import ConfigError
from diffusionlab.interop import is_pretrained, read_pretrained
from diffusionlab.interop.export import add_metrics, from_checkpoint, write_export

log = logging.getLogger(__name__)


def export(cfg: DictConfig) -> Path:
    """Write the folder ``cfg.dest`` from ``cfg.ckpt``; returns it."""
    if not cfg.ckpt:
        raise ConfigError("pass ckpt=<run>/checkpoints/last.ckpt (or an NVlabs .pkl)")
    if not cfg.dest:
        raise ConfigError("pass dest=<folder> for the exported model")
    weights = cfg.weights if isinstance(cfg.weights, str) else float(cfg.weights)
    if is_pretrained(cfg.ckpt):
        if weights != "ema":
            raise ConfigError(f"weights={cfg.weights}: {cfg.ckpt} holds one set of weights (ema)")
        model = read_pretrained(cfg.ckpt)
    else:
        model = from_checkpoint(cfg.ckpt, weights)
    if cfg.metrics:
        add_metrics(model, cfg.metrics)
    dest = write_export(model, cfg.dest, bool(cfg.overwrite))
    log.info("%s (%s weights) -> %s", cfg.ckpt, weights, dest)
    return dest


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
@user_errors_exit
def app(cfg: DictConfig) -> None:
    export(cfg)


def main() -> None:
    """``dl-export``: user errors end as one ``error: ...`` line, as in the other apps."""
    run_cli(app, "export")


if __name__ == "__main__":
    main()
