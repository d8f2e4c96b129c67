"""Sampling images/s of ``sample.py`` with 1 and 2 processes (torchrun), side by side.

    python bench/sample_processes.py [--quick] [--device cpu] [--model unet_tiny] [--nfe 35]
        [--num 64] [--batch 16] [--rounds 3] [--procs 1 2]

Each run is the real app as users start it, ``torchrun --standalone --nproc_per_node=N
sample.py ckpt=... `` into a fresh folder, on an untrained checkpoint of ``--model`` written
first; the runs alternate (1, 2, 1, 2, ...). Each side gets its best configuration: on CPU the
cores are split between the processes (``OMP_NUM_THREADS = cores / N``, so one process uses all
of them), and one process also runs with one thread (on a busy machine its threads can wait on
each other): the ratio is to the faster of the two. On GPUs each process has its own GPU. images/s is the app's own figure (all processes'
images over the wall clock of the generation, from the log line ``... s, X images/s``), so
start-up and model loading are left out; the ratio is N-process over 1-process images/s (2.0 =
linear). CPU seconds are those of the whole launch (start-up included). The images of every run
are compared so the race is fair: equal to those of the first run with as many threads per
process (whatever the number of processes); the largest pixel difference to another thread
count is printed (on CPU it sums the convolutions in another order).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from benchlib import machine, markdown_table, write_results
from PIL import Image
from trainstep import build_module

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
SPEED = re.compile(r"made (\d+) images.*?; ([\d.]+) s, ([\d.e+-]+) images/s")


def write_ckpt(args: argparse.Namespace, folder: Path) -> Path:
    """An untrained checkpoint of ``--model`` saved as train.py saves one (weights and EMA
    moved off their initialisation so every image depends on the network)."""
    torch.manual_seed(0)
    module = build_module(args.model, args.resolution, args.channels, [])
    with torch.no_grad():
        for p in module.denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
        module.ema.load_state_dict(module.denoiser.state_dict())
    path = folder / "bench.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def threads_of(procs: int, args: argparse.Namespace) -> int:
    """Torch threads per process: ``--threads``, else the CPU's cores split between them."""
    return args.threads or max(1, (os.cpu_count() or 1) // procs)


def run(
    procs: int, threads: int, ckpt: Path, outdir: Path, args: argparse.Namespace
) -> tuple[float, float]:
    """One launch of ``procs`` processes with ``threads`` torch threads each; returns (images/s
    of the generation, CPU seconds of the launch)."""
    cmd = [
        TORCHRUN,
        "--standalone",
        f"--nproc_per_node={procs}",
        "sample.py",
        f"ckpt={ckpt}",
        f"sampler={args.sampler}",
        f"sampler.nfe={args.nfe}",
        f"num_samples={args.num}",
        f"batch_size={args.batch}",
        "grid=false",
        f"device={args.device}",
        f"outdir={outdir}",
        f"paths.log_dir={outdir.parent / 'logs'}",
        "wandb.mode=disabled",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HYDRA_FULL_ERROR": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    found = SPEED.search(res.stdout + res.stderr)
    if res.returncode or not found:
        sys.exit(f"{' '.join(cmd)} failed:\n{(res.stdout + res.stderr)[-3000:]}")
    if int(found.group(1)) != args.num:
        sys.exit(f"{procs} process(es) made {found.group(1)} images, not {args.num}")
    return float(found.group(3)), cpu


def images(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in sorted(folder.glob("*.png"))}


def max_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> int:
    """The largest pixel difference (of 255) between two runs' images of the same seeds."""
    if a.keys() != b.keys():
        sys.exit(f"the runs wrote other files: {sorted(a.keys() ^ b.keys())[:5]}")
    return max(int(np.abs(a[k] - b[k]).max()) for k in a)


def configurations(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(processes, torch threads each) to run: ``--procs`` with the cores split between them
    (or ``--threads``); on CPU also one process with one thread, in case the split is not its
    best (threads that wait on each other on a busy machine)."""
    runs = [(p, threads_of(p, args)) for p in args.procs]
    if args.device == "cpu" and 1 in args.procs and (1, 1) not in runs:
        runs.insert(1, (1, 1))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke mode: NFE 9, 16 images")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (each process its own GPU)")
    ap.add_argument("--model", default="unet_tiny")
    ap.add_argument("--resolution", type=int, default=16)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--sampler", default="heun")
    ap.add_argument("--nfe", type=int, default=35)
    ap.add_argument("--num", type=int, default=64, help="images per run")
    ap.add_argument("--batch", type=int, default=16, help="images per batch and process")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (0: split)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (bench/results)")
    args = ap.parse_args()
    if args.quick:
        args.nfe, args.num, args.batch, args.rounds = 9, 16, 4, 1
    runs = configurations(args)
    ips: dict[tuple[int, int], list[float]] = {c: [] for c in runs}
    cpu: dict[tuple[int, int], list[float]] = {c: [] for c in runs}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_ckpt(args, Path(tmp))
        first: dict[int, dict[str, np.ndarray]] = {}  # the first run's images per thread count
        worst = 0
        for r in range(args.rounds):
            for procs, threads in runs:
                outdir = Path(tmp) / f"p{procs}-t{threads}-r{r}"
                speed, seconds = run(procs, threads, ckpt, outdir, args)
                ips[procs, threads].append(speed)
                cpu[procs, threads].append(seconds)
                pngs = images(outdir)
                same_threads = first.setdefault(threads, pngs)
                if max_difference(pngs, same_threads):
                    sys.exit(f"{procs} x {threads}: other images than {threads} thread(s) before")
                worst = max(worst, max_difference(pngs, next(iter(first.values()))))
                print(
                    f"round {r}, {procs} process(es) x {threads} thread(s): {speed:.2f} img/s, "
                    f"{seconds:.1f} CPU s",
                    flush=True,
                )
    med = {c: statistics.median(v) for c, v in ips.items()}
    # the ratio is to the best configuration of the fewest processes
    base = max(v for (p, _), v in med.items() if p == min(args.procs))
    rows = [
        (
            p,
            t,
            f"{med[p, t]:.2f}",
            " ".join(f"{v:.2f}" for v in ips[p, t]),
            f"{statistics.median(cpu[p, t]):.1f}",
            med[p, t] / base,
        )
        for p, t in runs
    ]
    header = ("processes", "threads each", "img/s (median)", "img/s per round", "CPU s", "ratio")
    table = markdown_table(header, rows)
    print(
        "images: byte for byte equal for the same threads per process; largest pixel "
        f"difference between thread counts {worst}/255 (float sums in another order)"
    )
    most = max(args.procs)
    payload = {
        "machine": machine(args.device),
        "model": args.model,
        "sampler": args.sampler,
        "nfe": args.nfe,
        "images": args.num,
        "batch": args.batch,
        "max_pixel_difference_across_thread_counts": worst,
        "images_per_s": {f"{p}x{t}": v for (p, t), v in ips.items()},
        "cpu_seconds": {f"{p}x{t}": v for (p, t), v in cpu.items()},
        "ratio": max(v for (p, _), v in med.items() if p == most) / base,
    }
    write_results("sample_processes", args.out, payload, table)


if __name__ == "__main__":
    main()
