"""W&B runs of the evaluate and sample apps: attached to the training runs whose checkpoints they
use (same group, the train runs' ids in the config), and tables with line plots for sweeps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from diffusionlab.tracking.loggers import resolve_wandb_mode
from diffusionlab.tracking.run_identity import (
    hydra_config,
    run_config,
    run_group,
    run_name,
)
from diffusionlab.tracking.run_record import read_run_record
from diffusionlab.tracking.secrets import secrets_kept_out


def train_run_of(ckpt: str | Path) -> dict[str, str] | None:
    """The W&B run of the training run that wrote ``ckpt``: id, name, group, project and entity
    from its ``run.json``, and the run directory. None when that run logged nothing to W&B."""
    found = read_run_record(ckpt)
    if found is None or not found[0].get("wandb_id"):
        return None
    record, run_dir = found
    return {
        "id": record["wandb_id"],
        "name": record["name"],
        "group": record["group"],
        "project": record.get("wandb_project"),
        "entity": record.get("wandb_entity"),
        "dir": str(run_dir),
    }


def start_wandb_run(cfg: DictConfig, ckpts: Sequence[str]) -> Any:
    """``wandb.init`` for an evaluate / sample job (job type ``cfg.task_name``), in the output
    directory. With checkpoints from one training run it joins that run's group, project and entity
    (unless ``wandb.project`` / ``wandb.entity`` say otherwise) and is named
    ``<train run name> | <own overrides>``; ``train_runs`` in its config lists the train runs."""
    import wandb

    w = cfg.wandb
    hydra = hydra_config()
    trains = [t for t in (train_run_of(c) for c in ckpts) if t is not None]
    own = run_name(hydra, list(w.name_exclude))
    names = {t["name"] for t in trains}
    groups = {t["group"] for t in trains}
    if len(names) == 1:
        (train_name,) = names
        name = train_name if own == "default" else f"{train_name} | {own}"
    else:
        name = own
    group = groups.pop() if len(groups) == 1 else run_group(hydra, cfg.paths.output_dir)
    project = w.get("project") or _shared(trains, "project") or "diffusionlab"
    entity = w.get("entity") or _shared(trains, "entity")
    config = {**run_config(cfg), "train_runs": trains}
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    with secrets_kept_out(OmegaConf.to_container(cfg, resolve=True), cfg.paths.output_dir):
        return wandb.init(
            dir=cfg.paths.output_dir,
            project=project,
            entity=entity,
            mode=resolve_wandb_mode(w.mode),
            name=w.name or name,
            group=w.group or group,
            job_type=cfg.task_name,
            tags=list(cfg.tags),
            config=config,
        )


def _shared(trains: list[dict], key: str) -> str | None:
    """The train runs' common ``key`` (project, entity), None when they differ or have none."""
    values = {t.get(key) for t in trains}
    return values.pop() if len(values) == 1 else None


def log_table(run: Any, key: str, rows: list[dict]) -> None:
    """Log ``rows`` (dicts with the same keys) as the W&B table ``key``."""
    import wandb

    columns = list(rows[0])
    run.log({key: wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])})


def log_curve(
    run: Any, table_key: str, plot_key: str, rows: list[dict], x: str, series: str | None
) -> None:
    """Log ``rows`` as the W&B table ``table_key`` and a line plot ``plot_key`` of FID against
    ``x`` (one line per value of ``series``): FID vs NFE per sampler, FID vs EMA length."""
    import wandb

    columns = list(rows[0])
    table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
    title = f"FID vs {'NFE' if x == 'nfe' else x}"
    run.log(
        {table_key: table, plot_key: wandb.plot.line(table, x, "fid", stroke=series, title=title)}
    )
