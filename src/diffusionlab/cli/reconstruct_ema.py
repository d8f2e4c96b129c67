"""``dl-reconstruct-ema ckpt=<run>/checkpoints/last.ckpt sigma_rel=[...]``: EMA checkpoints of any
length rebuilt from the power-function EMA snapshots of a run trained with ``ema=power`` (EDM2
App. C)."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from diffusionlab.checks import numbers
from diffusionlab.cli.common import run_cli, user_errors_exit
from diffusionlab.cli.vocabulary import warn_deprecated
from diffusionlab.config import CONF_DIR
from diffusionlab.errors import ConfigError
from diffusionlab.training.ema_snapshots import SNAPSHOT_FOLDER, write_reconstructions

log = logging.getLogger(__name__)


def reconstruct_ema(cfg: DictConfig) -> list[Path]:
    """Write ``<outdir>/ema_<sigma_rel>.ckpt`` for each ``sigma_rel``; returns their paths. The run
    folder is the checkpoint's (``<run>/checkpoints/<ckpt>``), else the snapshots'."""
    if cfg.get("run"):
        warn_deprecated("run", "ckpt", f"ckpt={cfg.run}/checkpoints/last.ckpt")
    if not cfg.ckpt and not cfg.get("run") and not cfg.snapshots:
        raise ConfigError(
            "pass ckpt=<run>/checkpoints/last.ckpt (or snapshots=<folder> with ckpt=<checkpoint>)"
        )
    values = numbers(cfg, "sigma_rel")
    if cfg.get("run"):
        run = Path(cfg.run).expanduser()
    elif cfg.ckpt:
        run = Path(cfg.ckpt).expanduser().resolve().parent.parent
    else:
        run = Path(cfg.snapshots).expanduser().parent
    snapshots = cfg.snapshots or run / SNAPSHOT_FOLDER
    ckpt = cfg.ckpt or run / "checkpoints" / "last.ckpt"
    out = Path(cfg.outdir or run / "ema_reconstructed").expanduser()
    paths = write_reconstructions(ckpt, snapshots, values, out)
    log.info("wrote %s", ", ".join(str(p) for p in paths))
    return paths


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="reconstruct_ema")
@user_errors_exit
def app(cfg: DictConfig) -> None:
    reconstruct_ema(cfg)


def main() -> None:
    """``dl-reconstruct-ema``: user errors end as one ``error: ...`` line."""
    run_cli(app, "reconstruct_ema")


if __name__ == "__main__":
    main()
