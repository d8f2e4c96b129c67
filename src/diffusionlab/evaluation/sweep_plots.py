"""Figures of sweeps: a training sweep's loss curves in one plot and its last sample grids side by
side (dl-compare); FID against NFE or EMA length (evaluate.py)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np

from diffusionlab.evaluation.sweep import Job


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def smoothed(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing slider)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i) if weight > 0 else v)
    return out


def plot_loss_curves(
    jobs: list[Job], labels: list[str], path: Path, loss_key: str, smooth: float
) -> None:
    """One line per job: ``loss_key`` against the optimizer step (log scale over a decade)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100, layout="constrained")
    for job, name in zip(jobs, labels, strict=True):
        if job.curve:
            steps, values = zip(*job.curve, strict=True)
            ax.plot(steps, smoothed(list(values), smooth), label=name, linewidth=1.2)
    values = [v for job in jobs for _, v in job.curve]
    if values and min(values) > 0 and max(values) > 10 * min(values):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(loss_key + (f" (EMA {smooth:g})" if smooth > 0 else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.savefig(path)
    plt.close(fig)


def plot_sample_grids(jobs: list[Job], labels: list[str], path: Path, columns: int) -> None:
    """The last ``samples/step_*.png`` of every job in a grid of panels titled by its overrides."""
    from PIL import Image

    plt = _pyplot()
    cols = max(1, min(columns, len(jobs)))
    rows = math.ceil(len(jobs) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3 * cols, 3.6 * rows), dpi=100, squeeze=False, layout="constrained"
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, job, name in zip(axes.flat, jobs, labels, strict=False):
        title = "\n".join(textwrap.wrap(name, 32))
        if job.samples is None:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.imshow(np.asarray(Image.open(job.samples).convert("RGB")))
            step = job.samples.stem.removeprefix("step_")
            title += f"\nstep {int(step)}" if step.isdigit() else f"\n{job.samples.stem}"
        ax.set_title(title, fontsize=8)
    fig.savefig(path, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)


def plot_fid_curve(rows: list[dict], x: str, series: str | None, path: Path) -> None:
    """FID against ``x`` on log-log axes, one line per value of ``series``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for name in dict.fromkeys(r[series] if series else None for r in rows):
        pts = [(r[x], r["fid"]) for r in rows if series is None or r[series] == name]
        ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE" if x == "nfe" else x)
    ax.set_ylabel("FID")
    if series:
        ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
