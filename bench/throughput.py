"""Training images/s, peak memory and MFU per model preset and precision, side by side.

    python bench/throughput.py [--quick] [--device cuda] [--models unet_ddpmpp ...]
        [--precisions 32-true bf16-mixed] [--compile] [--batch 128] [--resolution 32]

Each (model, precision, compile) configuration runs in its own process (so the CPU peak
resident memory is its own) and times ``--steps`` optimizer steps of the module's own pieces
(network, loss, backward, clipping, optimizer, EMA; bench/trainstep.py) on a synthetic batch,
after ``--warmup`` steps (which include torch.compile's compilation). FLOPs per step come from
torch's FLOP counter; MFU = achieved FLOP/s over the GPU's dense peak for that precision
(bf16/fp16 tensor cores; TF32 for 32-true unless matmul precision is "highest"). Ratios are to
the first precision of the same model. Peak memory: CUDA max allocated, or on CPU the worker
process's peak resident set (imports included).

GPU plan (docs/performance.md): ``--device cuda --models unet_ddpmpp --resolution 32 --channels 3
--batch 128 --precisions 32-true bf16-mixed --compile``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from benchlib import machine, markdown_table, write_results

QUICK = dict(models=["unet_tiny"], resolution=16, channels=1, batch=32, warmup=2, steps=5)


def run_one(args: argparse.Namespace) -> dict:
    """Measure one configuration in this process (the worker side)."""
    from trainstep import (
        OurStep,
        build_module,
        flops_per_step,
        images_per_s,
        peak_memory_mb,
        peak_tflops,
    )

    torch.manual_seed(0)
    torch.set_float32_matmul_precision(args.matmul_precision)
    if args.threads:
        torch.set_num_threads(args.threads)
    module = build_module(args.one, args.resolution, args.channels, args.override)
    params = sum(p.numel() for p in module.denoiser.parameters())
    # count FLOPs eagerly, before the network may be compiled
    flops = flops_per_step(OurStep(module, args.batch, args.device, args.precision).loss)
    step = OurStep(
        module,
        args.batch,
        args.device,
        precision=args.precision,
        compile=args.compile_one,
        channels_last=args.channels_last,
    )
    step.optimizer.zero_grad(set_to_none=True)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    ips, warm_s = images_per_s(step.step, args.batch, args.device, args.warmup, args.steps)
    peak = peak_tflops(args.device, args.precision, args.matmul_precision)
    achieved = flops * ips / args.batch
    return {
        "model": args.one,
        "precision": args.precision,
        "compile": args.compile_one,
        "params_M": params / 1e6,
        "batch": args.batch,
        "images_per_s": ips,
        "warmup_s": warm_s,
        "gflop_per_image": flops / args.batch / 1e9,
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / (peak * 1e12) if peak else None,
        "peak_memory_mb": peak_memory_mb(args.device),
    }


def measure(script: str, model: str, precision: str, compiled: bool, args) -> dict:
    """Run ``script --one model ...`` in a fresh process and return its RESULT line."""
    cmd = [sys.executable, script, "--one", model, "--precision", precision]
    cmd += ["--device", args.device, "--resolution", str(args.resolution)]
    cmd += ["--channels", str(args.channels), "--batch", str(args.batch)]
    cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    cmd += ["--threads", str(args.threads), "--matmul-precision", args.matmul_precision]
    cmd += ["--compile-one"] if compiled else []
    cmd += ["--channels-last"] if args.channels_last else []
    cmd += ["--override", *args.override] if args.override else []
    cmd += ["--edm-path", str(args.edm_path)] if getattr(args, "edm_path", None) else []
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{model} {precision} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])


def row(r: dict, ratio: float) -> tuple:
    """One markdown row of a measured configuration."""
    return (
        r["model"],
        r["precision"] + (" + compile" if r["compile"] else ""),
        f"{r['params_M']:.2f}",
        r["batch"],
        f"{r['images_per_s']:.3g}",
        ratio,
        f"{r['peak_memory_mb']:.0f}",
        f"{r['gflop_per_image']:.2f}",
        "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
    )


def add_config_args(ap: argparse.ArgumentParser) -> None:
    """Options shared with bench/edm_compare.py."""
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--matmul-precision", default="high", help="as matmul_precision in train.yaml")
    ap.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides")
    ap.add_argument("--out", type=Path, default=None, help="results folder (bench/results)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--compile-one", action="store_true", help=argparse.SUPPRESS)


HEADER = (
    "model",
    "precision",
    "params M",
    "batch",
    "img/s",
    "ratio",
    "peak mem MiB",
    "GFLOP/img",
    "MFU",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke mode: unet_tiny, 5 steps")
    ap.add_argument("--models", nargs="+", default=["unet_tiny", "unet_ddpmpp"])
    ap.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    ap.add_argument("--compile", action="store_true", help="also run each bf16/16 row compiled")
    add_config_args(ap)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    configs = [(m, p, False) for m in args.models for p in args.precisions]
    if args.compile:
        configs += [(m, p, True) for m in args.models for p in args.precisions if "16" in p]
    rows, results = [], []
    for model, precision, compiled in configs:
        r = measure(__file__, model, precision, compiled, args)
        results.append(r)
        base = next(x for x in results if x["model"] == model)
        rows.append(row(r, r["images_per_s"] / base["images_per_s"]))
        print(f"{model} {precision} compile={compiled}: {r['images_per_s']:.1f} img/s", flush=True)
    payload = {"machine": machine(args.device), "resolution": args.resolution, "rows": results}
    write_results("throughput", args.out, payload, markdown_table(HEADER, rows))


if __name__ == "__main__":
    main()
