"""REPA on the default run (issue 27): FID against training steps with and without REPA.

    python bench/repa.py [--steps 3000] [--every 500] [--seeds 0 1 2] [--num-samples 2000]
                         [--jobs 2] [--threads 1] [--extra repa.coefficient=0.5 ...]
                         [--out bench/results/repa]

Each (REPA off / on, seed) is the real ``train.py`` (the default run: unet_tiny on 16x16 MNIST)
with the FID callback (domain extractor, ``--num-samples`` samples of the EMA, sampler and seeds
as configured) every ``--every`` steps; ``repa=domain`` aligns ``enc.8x8_block0`` with the digit
classifier that is also the FID extractor. Prints FID per step (mean and std over seeds) and the
steps REPA needs to reach the baseline's final mean FID (target: at most 0.7x). CPU process time
is reported per run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from benchlib import machine, markdown_table, write_results

ROOT = Path(__file__).resolve().parents[1]


def run(arm: str, seed: int, args: argparse.Namespace, out: Path) -> tuple[dict[int, float], float]:
    """FID per step of one training run, and its CPU process time in seconds."""
    run_dir = out / f"{arm}-seed{seed}"
    overrides = [
        f"seed={seed}",
        f"trainer.max_steps={args.steps}",
        "trainer.max_time=null",  # the same steps however busy the machine is
        "callbacks=none",
        "logger=csv",
        "+eval@callbacks.fid=fid_callback",
        f"callbacks.fid.every_n_steps={args.every}",
        f"callbacks.fid.num_samples={args.num_samples}",
        "callbacks.fid.metrics=[fid]",
        f"sampler.nfe={args.nfe}",
        f"paths.cache_dir={out / 'cache'}",
        f"hydra.run.dir={run_dir}",
        *args.overrides,
        *(["repa=domain", *args.extra] if arm == "repa" else []),
    ]
    start = time.time()
    log = open(run_dir.with_suffix(".log"), "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=ROOT,
        env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(args.threads)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    _, status, usage = os.wait4(proc.pid, 0)  # this run's own CPU time
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode:
        tail = run_dir.with_suffix(".log").read_text()[-3000:]
        raise SystemExit(f"{arm} seed {seed} failed:\n{tail}")
    cpu = usage.ru_utime + usage.ru_stime
    # the FID callback's own log lines, "step N: {'fid': X}" (the CSV repeats a logged value on
    # later logging steps and numbers rows from 0)
    text = run_dir.with_suffix(".log").read_text()
    fids = {int(s): float(f) for s, f in re.findall(r"step (\d+): \{'fid': ([-\d.e]+)", text)}
    print(f"{arm} seed {seed}: {fids} ({cpu:.0f} s CPU, {time.time() - start:.0f} s wall)")
    return fids, cpu


def steps_to_reach(steps: list[int], fids: list[float], target: float) -> float:
    """The first step whose mean FID is at most ``target`` (linear between evaluations)."""
    for i, (s, f) in enumerate(zip(steps, fids, strict=True)):
        if f <= target:
            if i == 0:
                return float(s)
            s0, f0 = steps[i - 1], fids[i - 1]
            return s0 + (s - s0) * (f0 - target) / (f0 - f)
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--every", type=int, default=500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--nfe", type=int, default=35)
    p.add_argument("--overrides", nargs="*", default=[], help="more overrides of every run")
    p.add_argument("--extra", nargs="*", default=[], help="more overrides of the REPA runs")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "repa")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    curves: dict[str, list[dict[int, float]]] = {"baseline": [], "repa": []}
    cpu: dict[str, list[float]] = {"baseline": [], "repa": []}
    jobs = [(arm, seed) for seed in args.seeds for arm in curves]
    # without a cached domain classifier (FID extractor and REPA encoder alike) the first run
    # trains it alone, so every run reads the same file from the shared cache
    first = [] if (args.out / "cache" / "extractors").is_dir() else jobs[:1]
    done = [run(*job, args, args.out) for job in first]
    with ThreadPoolExecutor(args.jobs) as pool:
        done += list(pool.map(lambda job: run(*job, args, args.out), jobs[len(first) :]))
    for (arm, _), (fids, seconds) in zip(jobs, done, strict=True):
        curves[arm].append(fids)
        cpu[arm].append(seconds)
    steps = sorted(set.intersection(*(set(c) for arm in curves for c in curves[arm])))
    mean = {a: [float(np.mean([c[s] for c in curves[a]])) for s in steps] for a in curves}
    std = {a: [float(np.std([c[s] for c in curves[a]])) for s in steps] for a in curves}
    target = mean["baseline"][-1]
    reach = steps_to_reach(steps, mean["repa"], target)
    rows = [
        [s, *(f"{mean[a][i]:.3f} ± {std[a][i]:.3f}" for a in curves)] for i, s in enumerate(steps)
    ]
    table = markdown_table(["step", "FID baseline", "FID REPA"], rows)
    table += (
        f"\n\nREPA reaches the baseline's final FID {target:.3f} at step {reach:.0f} "
        f"= {reach / steps[-1]:.2f}x the steps (target <= 0.7x); CPU s per run: baseline "
        f"{np.mean(cpu['baseline']):.0f}, REPA {np.mean(cpu['repa']):.0f}"
    )
    payload = {
        "machine": machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "curves": curves,
        "cpu_s": cpu,
        "ratio": reach / steps[-1],
    }
    write_results("repa", args.out, payload, table)
    try:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for a in curves:
            ax.errorbar(steps, mean[a], yerr=std[a], label=a, marker="o", capsize=3)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"FID (domain, {args.num_samples} samples)")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "fid_vs_steps.png", dpi=120)
    except ImportError:
        pass
    print(table)


if __name__ == "__main__":
    main()
