"""Sampling images/s at a given NFE: the generation path (``sampling.generator.generate``)
against a bare Heun loop.

    python bench/sampling.py [--quick] [--device cpu] [--model unet_tiny] [--nfe 35] [--batch 64]

Both sides use the same (untrained) EMA denoiser, the same Karras sigma grid and Heun's 2nd-order
method (EDM Alg. 1, deterministic) with the same NFE. The bare loop is EDM's sampler written out
(about ten lines calling the denoiser); ``generate`` adds per-seed noise generators, the sampler
registry and the grid builder. Runs alternate; the ratio is median images/s of ``generate`` over
the bare loop's. Both outputs are compared (max abs difference printed) so the race is fair.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from benchlib import machine, markdown_table, timed, write_results
from trainstep import build_module

from diffusionlab.diffusion.noise import StackedRandomGenerator
from diffusionlab.diffusion.samplers import sigmas_for_nfe
from diffusionlab.sampling.generator import generate


@torch.no_grad()
def bare_heun(denoise, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """EDM's deterministic Heun sampler (Karras et al. 2022, Alg. 1), NFE = 2 N - 1."""
    x = noise * sigmas[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        d = (x - denoise(x, s.expand(x.shape[0]))) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d_next = (x_next - denoise(x_next, s_next.expand(x.shape[0]))) / s_next
            x_next = x + (s_next - s) * (d + d_next) / 2
        x = x_next
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke mode: NFE 9, batch 16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="unet_tiny")
    ap.add_argument("--resolution", type=int, default=16)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--nfe", type=int, default=35)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (bench/results)")
    args = ap.parse_args()
    if args.quick:
        args.nfe, args.batch, args.rounds = 9, 16, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    module = build_module(args.model, args.resolution, args.channels, []).to(args.device).eval()
    seeds = list(range(args.batch))
    cfg = {"name": "heun", "nfe": args.nfe, "discretization": "karras"}
    noise = StackedRandomGenerator(seeds, device=module.device).randn(
        (args.batch, *module.data_shape)
    )
    sigmas = sigmas_for_nfe(
        module.schedule, "heun", args.nfe, "karras", dtype=noise.dtype, device=module.device
    )
    nfe_bare = 2 * (len(sigmas) - 1) - 1
    ours = generate(module, seeds, sampler=cfg)
    bare = bare_heun(module.ema, noise, sigmas)
    diff = float((ours - bare).abs().max())
    print(f"NFE {args.nfe} (bare loop: {nfe_bare}); max |generate - bare| = {diff:.2e}")
    ips: dict[str, list[float]] = {"bare": [], "generate": []}
    for _ in range(args.rounds):
        t = timed(lambda: bare_heun(module.ema, noise, sigmas), args.device)
        ips["bare"].append(args.batch / t)
        t = timed(lambda: generate(module, seeds, sampler=cfg), args.device)
        ips["generate"].append(args.batch / t)
    med = {k: statistics.median(v) for k, v in ips.items()}
    rows = [
        (
            name,
            args.nfe,
            f"{med[name]:.1f}",
            " ".join(f"{v:.1f}" for v in ips[name]),
            med[name] / med["bare"],
        )
        for name in ips
    ]
    table = markdown_table(("loop", "NFE", "img/s (median)", "img/s per round", "ratio"), rows)
    payload = {
        "machine": machine(args.device),
        "model": args.model,
        "nfe": args.nfe,
        "batch": args.batch,
        "max_abs_diff": diff,
        "images_per_s": ips,
        "ratio": med["generate"] / med["bare"],
    }
    write_results("sampling", args.out, payload, table)


if __name__ == "__main__":
    main()
