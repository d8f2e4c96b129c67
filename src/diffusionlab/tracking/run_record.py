"""``run.json``: a training run's identity, written when training starts into the run folder,
beside its ``checkpoints/``.

It holds the run's id, name and group, the W&B run's id and project when W&B logs it, and the
SHA-256 of the config the loggers received. The sample and evaluate apps read it to attach their
own W&B runs to the training run that wrote a checkpoint (a resumed run in the same folder writes
it again: the newest run wins)."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from diffusionlab.files import atomic_write_text
from diffusionlab.tracking.run_identity import hydra_config, run_group, run_name

RUN_FILE = "run.json"


def config_digest(config: Mapping[str, Any]) -> str:
    """SHA-256 of a plain config as sorted JSON: equal configs, equal digests."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _wandb_run(loggers: Iterable[Logger]) -> Any:
    """The W&B run of the first W&B logger, None without one or with W&B disabled."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            return None if getattr(run, "disabled", False) else run
    return None


@rank_zero_only
def write_run_record(
    run_dir: str | Path, config: Mapping[str, Any], loggers: Iterable[Logger]
) -> Path:
    """Write ``<run_dir>/run.json`` for the training run whose loggers received ``config``; only
    the global rank-0 process writes it."""
    wandb = _wandb_run(loggers)
    hydra = hydra_config()
    record = {
        "run_id": wandb.id if wandb is not None else secrets.token_hex(4),
        "name": wandb.name if wandb is not None else run_name(hydra),
        "group": wandb.group if wandb is not None else run_group(hydra, fallback=run_dir),
        "wandb_id": wandb.id if wandb is not None else None,
        "wandb_project": wandb.project if wandb is not None else None,
        "wandb_entity": wandb.entity if wandb is not None else None,
        "config_sha256": config_digest(config),
        "dir": str(Path(run_dir).resolve()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return atomic_write_text(Path(run_dir) / RUN_FILE, json.dumps(record, indent=2) + "\n")


def read_run_record(ckpt: str | Path) -> tuple[dict[str, Any], Path] | None:
    """The ``run.json`` of the training run that wrote ``ckpt`` (``<run>/checkpoints/x.ckpt``, or
    ``<run>/ema_reconstructed/x.ckpt`` by dl-reconstruct-ema) and that run's folder; None when
    there is none or it is unreadable."""
    run_dir = Path(ckpt).resolve().parent.parent
    try:
        return json.loads((run_dir / RUN_FILE).read_text()), run_dir
    except (OSError, ValueError):
        return None
