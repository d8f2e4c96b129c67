"""Training images/s with 1 and 2 processes (DDP over gloo on CPU, NCCL on GPUs), side by side.

    python bench/ddp.py [--quick] [--steps 40] [--rounds 2] [--device cpu] [overrides ...]

Each run is ``trainer.fit`` of the default config with ``callbacks=none logger=none``,
``strategy=ddp_spawn`` and ``trainer.devices=N``; the global batch is ``--batch`` x N, so each
process keeps a batch of ``--batch`` (weak scaling), and one torch thread (so 2 processes use the 2 cores one process leaves idle). Rank 0
times the steps after ``--warmup`` (wall clock: processes run in parallel). images/s counts the
images of all ranks; the ratio is 2-process over 1-process images/s (2.0 = linear scaling).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from benchlib import compose_train, machine, markdown_table, sync, write_results

from diffusionlab.cli.train import build, make_trainer


class FileClock(L.Callback):
    """Rank 0 writes its batch start times, last batch end and images per step to ``path``."""

    def __init__(self, path: Path, device: str) -> None:
        self.path, self.device = path, device
        self.starts: list[float] = []
        self.end = 0.0
        self.images = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sync(self.device)
        self.starts.append(time.perf_counter())
        self.images = batch[0].shape[0] * trainer.world_size

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(self.device)
        self.end = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            data = {"starts": self.starts, "end": self.end, "images": self.images}
            self.path.write_text(json.dumps(data))


def fit(procs: int, args: argparse.Namespace, run_dir: Path) -> float:
    accel = "gpu" if args.device.startswith("cuda") else "cpu"
    cfg = compose_train(
        [
            *args.overrides,
            "callbacks=none",
            "logger=none",
            f"trainer.max_steps={args.warmup + args.steps}",
            "trainer.max_time=null",
            f"trainer.accelerator={accel}",
            "+trainer.strategy=ddp_spawn",
            f"trainer.devices={procs}",
            f"data.batch_size={args.batch * procs}",
            "+trainer.enable_progress_bar=false",
            f"paths.log_dir={run_dir}",
        ],
        run_dir,
    )
    L.seed_everything(cfg.seed, workers=True)
    module, datamodule = build(cfg)
    clock = FileClock(run_dir / "clock.json", args.device)
    trainer = make_trainer(cfg, datamodule, [clock])
    trainer.fit(module, datamodule=datamodule)
    data = json.loads(clock.path.read_text())
    return args.steps * data["images"] / (data["end"] - data["starts"][args.warmup])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml")
    ap.add_argument("--quick", action="store_true", help="CPU smoke mode: 10 steps, 1 round")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64, help="images per process and step")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="results folder (bench/results)")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup, args.rounds = 10, 3, 1
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    ips: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for procs in ips:
                run_dir = Path(tmp) / f"p{procs}-{r}"
                run_dir.mkdir()
                ips[procs].append(fit(procs, args, run_dir))
                print(f"round {r}, {procs} process(es): {ips[procs][-1]:.1f} img/s", flush=True)
    med = {p: statistics.median(v) for p, v in ips.items()}
    rows = [
        (p, f"{med[p]:.1f}", " ".join(f"{v:.1f}" for v in ips[p]), med[p] / med[1]) for p in ips
    ]
    table = markdown_table(("processes", "img/s (median)", "img/s per round", "ratio"), rows)
    payload = {
        "machine": machine(args.device),
        "overrides": args.overrides,
        "images_per_s": {str(k): v for k, v in ips.items()},
        "ratio": med[2] / med[1],
    }
    write_results("ddp", args.out, payload, table)


if __name__ == "__main__":
    main()
