"""Logger factories. W&B defaults to offline so runs can be ``wandb sync``-ed later."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger


def wandb_is_logged_in() -> bool:
    """True when an API key is available (env var or ~/.netrc entry for the W&B host)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def resolve_wandb_mode(mode: str) -> str:
    """``auto``: the ``WANDB_MODE`` env var if set, else online when logged in, else offline."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    return "online" if wandb_is_logged_in() else "offline"


def wandb_logger(
    save_dir: str, project: str = "diffusionlab", mode: str = "auto", **kwargs
) -> WandbLogger:
    """A ``WandbLogger`` whose mode follows ``resolve_wandb_mode`` (never ``offline=True``, which
    would override ``WANDB_MODE=disabled``)."""
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(save_dir=save_dir, project=project, mode=resolve_wandb_mode(mode), **kwargs)
