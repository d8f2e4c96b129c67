"""unet_ddpmpp training speed against NVlabs/edm's own training loop, same network and batch.

    python bench/edm_compare.py --edm-path /path/to/edm [--quick] [--device cuda] [--batch 128]
        [--compile]

Skipped (a note and ``{"skipped": true}`` in the JSON) without ``--edm-path``; nothing of EDM is
vendored. EDM side, in its own process: ``training.networks.EDMPrecond`` around its
``SongUNet`` with the DDPM++ CIFAR-10 arguments of its ``train.py`` (``--arch=ddpmpp``, dropout
0.13, no augmentation so both nets have 55.73 M parameters), ``training.loss.EDMLoss``, Adam
(lr 10e-4), and the body of ``training_loop.py``'s loop: zero_grad, loss.sum() / batch backward,
learning-rate ramp, ``nan_to_num`` on the gradients, step, EMA lerp; with its settings (cudnn
benchmark on, TF32 off). Ours: the same step through ``DiffusionModule`` (bench/trainstep.py)
at 32-true (TF32 per ``matmul_precision: high``), bf16-mixed and, with ``--compile``,
bf16-mixed + torch.compile. Ratio = images/s over EDM fp32 images/s (the GPU target is >= 2 for
bf16 + compile).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from benchlib import machine, markdown_table, write_results
from throughput import HEADER, add_config_args, measure, row, run_one

# NVlabs/edm train.py --arch=ddpmpp (CIFAR-10 32x32), augmentation off.
EDM_DDPMPP = dict(
    model_type="SongUNet",
    embedding_type="positional",
    encoder_type="standard",
    decoder_type="standard",
    channel_mult_noise=1,
    resample_filter=[1, 1],
    model_channels=128,
    channel_mult=[2, 2, 2],
    dropout=0.13,
)


def run_edm(args: argparse.Namespace) -> dict:
    """EDM's training step, timed in this process (worker side)."""
    from trainstep import flops_per_step, images_per_s, peak_memory_mb, peak_tflops

    sys.path.insert(0, str(Path(args.edm_path).resolve()))
    from training.loss import EDMLoss
    from training.networks import EDMPrecond

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True  # EDM training_loop.py settings
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    device, batch = torch.device(args.device), args.batch
    net = EDMPrecond(args.resolution, args.channels, label_dim=0, use_fp16=False, **EDM_DDPMPP)
    net = net.train().requires_grad_(True).to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=10e-4, betas=[0.9, 0.999], eps=1e-8)
    loss_fn = EDMLoss()
    images = torch.rand(batch, args.channels, args.resolution, args.resolution, device=device)
    images = images * 2 - 1
    state = {"nimg": 0}

    def loss() -> torch.Tensor:
        return loss_fn(net=net, images=images, labels=None).sum().mul(1 / batch)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        for g in optimizer.param_groups:
            g["lr"] = 10e-4 * min(state["nimg"] / max(10000 * 1000, 1e-8), 1)
        for param in net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        optimizer.step()
        halflife = min(500 * 1000, state["nimg"] * 0.05)
        beta = 0.5 ** (batch / max(halflife, 1e-8))
        for p_ema, p_net in zip(ema.parameters(), net.parameters(), strict=True):
            p_ema.copy_(p_net.detach().lerp(p_ema, beta))
        state["nimg"] += batch

    flops = flops_per_step(loss)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ips, warm_s = images_per_s(step, batch, args.device, args.warmup, args.steps)
    peak = peak_tflops(args.device, "32-true", "highest")
    achieved = flops * ips / batch
    return {
        "model": "NVlabs/edm SongUNet",
        "precision": "32-true (TF32 off)",
        "compile": False,
        "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
        "batch": batch,
        "images_per_s": ips,
        "warmup_s": warm_s,
        "gflop_per_image": flops / batch / 1e9,
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / (peak * 1e12) if peak else None,
        "peak_memory_mb": peak_memory_mb(args.device),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edm-path", type=Path, help="a checkout of github.com/NVlabs/edm")
    ap.add_argument("--quick", action="store_true", help="CPU smoke mode: batch 2, 2 steps")
    ap.add_argument("--compile", action="store_true", help="add a bf16-mixed + compile row")
    add_config_args(ap)
    args = ap.parse_args()
    if args.one == "edm":
        print("RESULT " + json.dumps(run_edm(args)), flush=True)
        return
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    info = machine(args.device)
    if args.edm_path is None or not (args.edm_path / "training" / "networks.py").is_file():
        note = f"skipped: --edm-path {args.edm_path} is not an NVlabs/edm checkout"
        if args.edm_path is None:
            note = "skipped: no --edm-path (a checkout of github.com/NVlabs/edm) given"
        write_results("edm_compare", args.out, {"machine": info, "skipped": True}, note)
        return
    if args.quick:
        args.batch, args.warmup, args.steps = 2, 1, 2
    configs = [("edm", "32-true", False), ("unet_ddpmpp", "32-true", False)]
    configs.append(("unet_ddpmpp", "bf16-mixed", False))
    if args.compile:
        configs.append(("unet_ddpmpp", "bf16-mixed", True))
    results = []
    for model, precision, compiled in configs:
        results.append(measure(__file__, model, precision, compiled, args))
        print(f"{results[-1]['model']} {precision}: {results[-1]['images_per_s']:.1f} img/s")
    edm = results[0]["images_per_s"]
    rows = [row(r, r["images_per_s"] / edm) for r in results]
    payload = {
        "machine": info,
        "skipped": False,
        "rows": results,
        "ratio_best_to_edm_fp32": max(r["images_per_s"] for r in results[1:]) / edm,
    }
    write_results("edm_compare", args.out, payload, markdown_table(HEADER, rows))


if __name__ == "__main__":
    main()
