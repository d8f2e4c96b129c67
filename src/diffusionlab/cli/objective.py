"""The number a training job hands back to a Hydra sweeper (``optimized_metric``)."""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from diffusionlab.errors import ConfigError


def sweeper_needs_value() -> bool:
    """True inside a multirun whose sweeper optimises the returned value (Optuna, not the grid)."""
    if not HydraConfig.initialized():
        return False
    hc = HydraConfig.get()
    return hc.mode == RunMode.MULTIRUN and not hc.sweeper._target_.endswith("BasicSweeper")


def optimized_value(metrics: dict[str, float], name: str | None) -> float | None:
    """``metrics[name]``; a search sweeper gets a clear error when the run never logged it."""
    if name and name in metrics:
        return metrics[name]
    if sweeper_needs_value():
        raise ConfigError(
            f"optimized_metric={name!r} was not logged by this run (logged: "
            f"{', '.join(sorted(metrics)) or 'nothing'}); pick one of those or add the callback "
            "that logs it (eval/fid: +eval@callbacks.fid=fid_callback)"
        )
    return None
