"""The jobs of a Hydra multirun read back from disk: overrides, final metrics, loss curve, samples.

Only files are read (``<job>/.hydra/overrides.yaml``, ``<job>/metrics.csv`` from the CSV logger,
``<job>/samples/step_*.png``), so a sweep can be compared on any machine without W&B."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from diffusionlab.errors import ConfigError
from diffusionlab.evaluation.tables import markdown_lines


@dataclass
class Job:
    """One job directory of a sweep."""

    name: str
    path: Path
    overrides: dict[str, str]
    final: dict[str, float] = field(default_factory=dict)
    step: int | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)
    samples: Path | None = None


def parse_overrides(lines: list[str]) -> dict[str, str]:
    """``["optimizer.lr=0.001", "~callbacks.x=null"]`` -> ``{"optimizer.lr": "0.001", ...}``."""
    out = {}
    for line in lines:
        key, _, value = str(line).partition("=")
        out[key] = value
    return out


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_metrics(
    path: Path, loss_key: str
) -> tuple[dict[str, float], int | None, list[tuple[int, float]]]:
    """Last logged value of every column of a CSV-logger file, its last step, and the loss curve."""
    final: dict[str, float] = {}
    curve: list[tuple[int, float]] = []
    step = None
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            row_step = _number(row.get("step") or "")
            if row_step is not None:
                step = int(row_step)
            for key, text in row.items():
                value = _number(text or "")
                if value is None or key in ("step", "epoch"):
                    continue
                final[key] = value
                if key == loss_key and row_step is not None:
                    curve.append((int(row_step), value))
    return final, step, curve


def last_samples(job_dir: Path) -> Path | None:
    """The newest sample grid ``samples/step_XXXXXX.png`` (zero-padded, so the last by name)."""
    grids = sorted((job_dir / "samples").glob("step_*.png"))
    return grids[-1] if grids else None


def _job_order(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 30, path.name)


def read_sweep(sweep: str | Path, loss_key: str = "train/loss") -> list[Job]:
    """Every job of a multirun folder (``logs/<task>/multiruns/<timestamp>``), in job order."""
    root = Path(sweep).expanduser()
    if not root.is_dir():
        raise ConfigError(f"sweep_dir={str(sweep)!r} is not a folder")
    if (root / ".hydra").is_dir():
        raise ConfigError(
            f"sweep_dir={str(sweep)!r} is a single run (it has .hydra/), not a sweep; pass a multirun "
            "folder such as logs/train/multiruns/<timestamp>"
        )
    dirs = sorted(
        (p for p in root.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()), key=_job_order
    )
    if not dirs:
        raise ConfigError(
            f"sweep_dir={str(sweep)!r} holds no job folders (<job>/.hydra/overrides.yaml): "
            "not a Hydra multirun folder"
        )
    jobs = []
    for d in dirs:
        overrides = parse_overrides(yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text()))
        job = Job(d.name, d, overrides, samples=last_samples(d))
        if (d / "metrics.csv").is_file():
            job.final, job.step, job.curve = read_metrics(d / "metrics.csv", loss_key)
        jobs.append(job)
    return jobs


def varying_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value is not the same in every job (what tells the jobs apart)."""
    keys = list(dict.fromkeys(k for job in jobs for k in job.overrides))
    return [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]


def short_value(text: str) -> str:
    """A float override written with 4 significant digits (``0.00024156772`` -> ``0.0002416``)."""
    value = _number(text)
    if value is None or text.lstrip("-").isdigit():
        return text
    return f"{value:.4g}"


def label(job: Job, keys: list[str]) -> str:
    """``optimizer.lr=0.001 ema.decay=0.9``: the job's values of the varying keys."""
    if not keys:
        return f"job {job.name}"
    return " ".join(f"{k}={short_value(job.overrides.get(k, '-'))}" for k in keys)


def table_rows(jobs: list[Job], metrics: list[str]) -> tuple[list[str], list[dict]]:
    """Columns and rows of the comparison: job, varying overrides, last step, final metrics."""
    keys = varying_keys(jobs)
    present = [m for m in metrics if any(m in job.final for job in jobs)]
    columns = ["job", *keys, "step", *present]
    rows = []
    for job in jobs:
        row: dict = {"job": job.name, "step": job.step}
        row.update({k: job.overrides.get(k) for k in keys})
        row.update({m: job.final.get(m) for m in present})
        rows.append(row)
    return columns, rows


def write_markdown(
    path: Path, title: str, columns: list[str], rows: list[dict], jobs: list[Job]
) -> None:
    """The table in markdown, headed by the overrides every job shares."""
    varying = set(varying_keys(jobs))
    common = [f"`{k}={v}`" for k, v in jobs[0].overrides.items() if k not in varying]
    lines = [f"# {title}: {len(jobs)} jobs", ""]
    if common:
        lines += ["Shared overrides: " + " ".join(common), ""]
    lines += markdown_lines(columns, rows)
    path.write_text("\n".join(lines) + "\n")
