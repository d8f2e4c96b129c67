"""``dl-compare sweep_dir=logs/train/multiruns/<ts>``: one table (markdown + CSV) of a sweep's jobs,
their loss curves in one PNG and their last sample grids side by side."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from diffusionlab.cli.common import run_cli, user_errors_exit
from diffusionlab.config import CONF_DIR
from diffusionlab.errors import ConfigError
from diffusionlab.evaluation.sweep import (
    label,
    read_sweep,
    table_rows,
    varying_keys,
    write_markdown,
)
from diffusionlab.evaluation.sweep_plots import plot_loss_curves, plot_sample_grids
from diffusionlab.evaluation.tables import write_csv

log = logging.getLogger(__name__)


def compare(cfg: DictConfig) -> dict[str, Path]:
    """Write compare.md, compare.csv, loss_curves.png and samples_grid.png; returns their paths."""
    if OmegaConf.is_missing(cfg, "sweep_dir"):
        raise ConfigError(
            "pass sweep_dir=<multirun folder>, e.g. sweep_dir=logs/train/multiruns/<timestamp>"
        )
    jobs = read_sweep(cfg.sweep_dir, cfg.loss_key)
    out = Path(cfg.outdir or cfg.sweep_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    keys = varying_keys(jobs)
    labels = [label(job, keys) for job in jobs]
    columns, rows = table_rows(jobs, list(cfg.metrics))
    paths = {name: out / name for name in ("compare.md", "compare.csv")}
    paths |= {name: out / name for name in ("loss_curves.png", "samples_grid.png")}
    write_markdown(paths["compare.md"], f"Sweep {Path(cfg.sweep_dir).name}", columns, rows, jobs)
    write_csv(paths["compare.csv"], columns, rows)
    plot_loss_curves(jobs, labels, paths["loss_curves.png"], cfg.loss_key, float(cfg.smooth))
    plot_sample_grids(jobs, labels, paths["samples_grid.png"], int(cfg.columns))
    log.info("%d jobs compared:\n%s", len(jobs), paths["compare.md"].read_text())
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="compare")
@user_errors_exit
def app(cfg: DictConfig) -> None:
    compare(cfg)


def main() -> None:
    """``dl-compare``: user errors end as one ``error: ...`` line, as in the other apps."""
    run_cli(app, "compare")


if __name__ == "__main__":
    main()
