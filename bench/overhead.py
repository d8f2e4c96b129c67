"""Framework overhead: the Lightning training step against a bare PyTorch loop, side by side.

    python bench/overhead.py [--quick] [--steps 150] [--rounds 3] [--device cpu] [overrides ...]

Both sides train the same config (default: the default run, ``unet_tiny`` on 16x16 MNIST, batch
64) from the same seed and time the same window of optimizer steps after a warm-up:

- bare loop: ``module.batch_loss(batch)`` (per-sample seeded sigma and noise), mean, backward, gradient
  clipping at ``trainer.gradient_clip_val``, the module's own optimizer + LambdaLR
  (``configure_optimizers``), ``ema_update`` with the module's EMA schedule, and the datamodule's
  own DataLoader; nothing else.
- lightning: ``trainer.fit`` with everything the default run has: the callbacks (checkpointing,
  sample grid, rich progress bar, LR monitor) and loggers (CSV, W&B offline) of ``conf/``. The
  sample grid and checkpoints fire every 500 / 1,000 steps and so fall outside the window; all
  per-step work (logging, progress bar, callbacks' hooks) is inside it.
- lightning-bare: ``trainer.fit`` with ``callbacks=none logger=none`` (the training loop alone).

Runs alternate (bare, lightning, lightning-bare, bare, ...) so machine load hits all sides alike.
Each run records the duration of every timed step; a side's headline images/s takes, for each
step index, the fastest of its rounds, and sums those (the logging steps fall on the same indices
in every round, so they stay in; a burst of load from another job on one round drops out). The
ratio is lightning over bare; plain per-round images/s are in the JSON too. On CPU the clock is the
process's CPU time (``--clock process``, default there, one torch thread by default): other jobs on
a shared machine then barely move the ratio. On CUDA it is wall-clock time after a synchronize.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from itertools import cycle
from pathlib import Path

import lightning as L
import torch
import wandb
from benchlib import compose_train, machine, markdown_table, sync, write_results

from diffusionlab.cli.train import build, make_trainer
from diffusionlab.training.ema import ema_update

CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
CLOCK = time.perf_counter


class StepClock(L.Callback):
    """Clock reading at the start of every training batch and at the end of the last one."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.starts: list[float] = []
        self.end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sync(self.device)
        self.starts.append(CLOCK())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(self.device)
        self.end = CLOCK()


def _config(overrides: list[str], steps: int, device: str, run_dir: Path) -> object:
    accel = "gpu" if device.startswith("cuda") else "cpu"
    return compose_train(
        [
            *overrides,
            f"trainer.max_steps={steps}",
            "trainer.max_time=null",
            f"trainer.accelerator={accel}",
            f"paths.log_dir={run_dir}",
        ],
        run_dir,
    )


def bare_loop(cfg, warmup: int, device: str) -> list[float]:
    """Step durations of the plain PyTorch loop over the module's own pieces (after warm-up)."""
    L.seed_everything(cfg.seed, workers=True)
    module, datamodule = build(cfg)
    module.to(device).train()
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    opt_cfg = module.configure_optimizers()
    optimizer, scheduler = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    clip = cfg.trainer.gradient_clip_val
    bf16 = str(cfg.trainer.precision).startswith("bf16")
    steps, batch = int(cfg.trainer.max_steps), int(cfg.data.batch_size)
    marks = []
    for step, (x0, labels, seeds) in zip(range(steps), cycle(loader), strict=False):
        if step >= warmup:
            sync(device)
            marks.append(CLOCK())
        x0, labels = x0.to(device), labels.to(device)
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16):
            per_sample, _ = module.batch_loss((x0, labels, seeds))
            loss = per_sample.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        optimizer.step()
        scheduler.step()
        ema_update(module.ema, module.denoiser, module.ema_schedule.beta(step, batch))
    sync(device)
    marks.append(CLOCK())
    return [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]


def lightning_fit(cfg, warmup: int, device: str) -> list[float]:
    """Step durations of ``trainer.fit`` as ``train.py`` builds it (after warm-up)."""
    L.seed_everything(cfg.seed, workers=True)
    module, datamodule = build(cfg)
    clock = StepClock(device)
    trainer = make_trainer(cfg, datamodule, [clock])
    trainer.fit(module, datamodule=datamodule)
    if wandb.run is not None:  # close the run so its service is idle during the next run
        wandb.finish()
    marks = [*clock.starts[warmup:], clock.end]
    return [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml")
    ap.add_argument("--quick", action="store_true", help="CPU smoke mode: 40 steps, 2 rounds")
    ap.add_argument("--steps", type=int, default=100, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps per run")
    ap.add_argument("--rounds", type=int, default=3, help="runs per side, alternating")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), help="default: process on CPU, else wall")
    ap.add_argument("--out", type=Path, default=None, help="results folder (bench/results)")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup, args.rounds = 40, 10, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    clock = args.clock or ("process" if args.device == "cpu" else "wall")
    CLOCK = CLOCKS[clock]
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    sides = {
        "bare": (bare_loop, []),
        "lightning": (lightning_fit, []),
        "lightning-bare": (lightning_fit, ["callbacks=none", "logger=none"]),
    }
    durations: dict[str, list[list[float]]] = {name: [] for name in sides}
    ips: dict[str, list[float]] = {name: [] for name in sides}
    batch = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, (fn, extra) in sides.items():
                run_dir = Path(tmp) / f"{name}-{r}"
                steps = args.warmup + args.steps
                cfg = _config([*args.overrides, *extra], steps, args.device, run_dir)
                batch = int(cfg.data.batch_size)
                durations[name].append(fn(cfg, args.warmup, args.device))
                ips[name].append(batch * args.steps / sum(durations[name][-1]))
                print(f"round {r} {name}: {ips[name][-1]:.1f} img/s", flush=True)
    best = {
        name: batch * args.steps / sum(min(ds) for ds in zip(*runs, strict=True))
        for name, runs in durations.items()
    }
    rows = [
        (
            name,
            f"{best[name]:.1f}",
            " ".join(f"{v:.1f}" for v in ips[name]),
            best[name] / best["bare"],
            statistics.median(ips[name]) / statistics.median(ips["bare"]),
        )
        for name in sides
    ]
    header = ("loop", "img/s (best per step)", "img/s per round", "ratio", "ratio of medians")
    table = markdown_table(header, rows)
    payload = {
        "machine": machine(args.device),
        "overrides": args.overrides,
        "clock": clock,
        "steps": args.steps,
        "warmup": args.warmup,
        "images_per_s": ips,
        "best_per_step": best,
        "ratio": best["lightning"] / best["bare"],
        "ratio_lightning_bare": best["lightning-bare"] / best["bare"],
        "ratio_of_medians": statistics.median(ips["lightning"]) / statistics.median(ips["bare"]),
    }
    write_results("overhead", args.out, payload, table)


if __name__ == "__main__":
    main()
