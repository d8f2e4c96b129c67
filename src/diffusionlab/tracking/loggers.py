"""Logger factories. W&B defaults to offline so runs can be ``wandb sync``-ed later."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger

from diffusionlab.tracking.run_identity import NAME_EXCLUDE, hydra_config, run_group, run_name


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
    save_dir: str,
    project: str = "diffusionlab",
    mode: str = "auto",
    name: str | None = None,
    group: str | None = None,
    name_exclude: Sequence[str] = NAME_EXCLUDE,
    **kwargs,
) -> WandbLogger:
    """A ``WandbLogger`` whose mode follows ``resolve_wandb_mode`` (never ``offline=True``, which
    would override ``WANDB_MODE=disabled``). ``name`` / ``group`` left empty come from Hydra:
    the job's overrides (without ``name_exclude`` keys) and the sweep's directory name."""
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    hydra = hydra_config()
    return WandbLogger(
        save_dir=save_dir,
        project=project,
        mode=resolve_wandb_mode(mode),
        name=name or run_name(hydra, name_exclude),
        group=group or run_group(hydra, fallback=save_dir),
        **kwargs,
    )


@contextmanager
def finish_wandb_run() -> Iterator[None]:
    """Finish this process's W&B run when the block ends (exit code 1 on an error), so the next
    job of a Hydra multirun starts its own run instead of reusing this one."""
    try:
        yield
    except SystemExit as e:  # a clean exit (a preempted run saved and stopped) is no failure
        _finish(exit_code=0 if e.code in (None, 0) else 1)
        raise
    except BaseException:
        _finish(exit_code=1)
        raise
    _finish(exit_code=0)


def _finish(exit_code: int) -> None:
    wandb = sys.modules.get("wandb")  # never imported: no run to finish
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)
