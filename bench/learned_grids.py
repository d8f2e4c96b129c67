"""Learned sigma grids vs every hand-made grid on closed-form targets (issue 13).

    python bench/learned_grids.py [--nfe 5 10] [--steps 200] [--n-fit 128] [--n-test 1000]

For gaussian16 and gmm8ring (bench/samplers.py) and each NFE: every deterministic sampler of ours
on the Karras (rho 7), log-SNR and uniform-t (EDM: uniform sigma) grids, plus k-diffusion's on
Karras when importable, measured as the mean distance to the exact PF-ODE endpoint on test noise;
then ``fit_discretization`` for each sampler of ``--samplers`` (fitted on other noise draws,
teacher Heun at ``--teacher-nfe``, both ends learned within [0.002, 80]) measured on the same test
noise. Ratio = learned / best hand-made (sampler, grid) pair at the same NFE.
"""

from __future__ import annotations

import argparse
import time

import torch
from benchlib import machine, markdown_table, write_results
from samplers import OURS, SMAX, SMIN, analytic_targets, exact_endpoint, k_sampling

from diffusionlab.diffusion import discretizations as dz
from diffusionlab.diffusion import samplers as S
from diffusionlab.diffusion.grid_fit import fit_discretization
from diffusionlab.diffusion.schedules import get_schedule

LEARNED = ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc"]
GRIDS = ("karras", "logsnr", "time_uniform")


def label(name: str, opts: dict) -> str:
    return name + "".join(f"_{k}{v:g}" for k, v in opts.items())


def hand_made(target, noise: torch.Tensor, exact: torch.Tensor, nfe: int, ks) -> list[dict]:
    """Every (sampler, hand-made grid) pair at ``nfe``: its mean distance to the exact endpoint."""
    schedule = get_schedule("edm", sigma_min=SMIN, sigma_max=SMAX)
    rows = []
    for name, opts in OURS:
        n = S.steps_for_nfe(name, nfe, **opts)
        for grid in GRIDS:
            sig = dz.get_sigmas(grid, n, schedule, sigma_min=SMIN, sigma_max=SMAX)
            x = S.get_sampler(name, **opts)(target, noise, sig)
            err = float((x - exact).norm(dim=1).mean())
            rows.append({"who": "ours", "sampler": label(name, opts), "grid": grid, "error": err})
    if ks is not None:
        from samplers import K_SAMPLERS

        for kname, kopts, cost in K_SAMPLERS:
            n = max(k for k in range(1, nfe + 1) if cost(k) <= nfe)
            x = getattr(ks, kname)(target, noise, dz.karras(n, SMIN, SMAX), disable=True, **kopts)
            err = float((x - exact).norm(dim=1).mean())
            rows.append({"who": "k-diffusion", "sampler": kname, "grid": "karras", "error": err})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nfe", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--samplers", nargs="+", default=LEARNED)
    ap.add_argument("--targets", nargs="+", default=["gaussian16", "gmm8ring"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--n-fit", type=int, default=128, help="noise draws the grid is fitted on")
    ap.add_argument("--n-test", type=int, default=1000, help="fresh draws it is measured on")
    ap.add_argument("--teacher-nfe", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=str, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ks = k_sampling()
    t0 = time.time()
    results, table_rows = [], []
    for tname, target in analytic_targets(torch.Generator().manual_seed(0)):
        if tname not in args.targets:
            continue
        gen = torch.Generator().manual_seed(1000)  # test noise: not the fit's seeds (0, 1, 2)
        noise = torch.randn(args.n_test, target.dim, dtype=torch.float64, generator=gen) * SMAX
        exact = exact_endpoint(target, noise)
        for nfe in args.nfe:
            hand = hand_made(target, noise, exact, nfe, ks)
            best = min(hand, key=lambda r: r["error"])
            learned = []
            for name in args.samplers:
                fit = fit_discretization(
                    target,
                    (target.dim,),
                    name,
                    nfe,
                    teacher_nfe=args.teacher_nfe,
                    num_samples=args.n_fit,
                    sigma_min=SMIN,
                    sigma_max=SMAX,
                    bounds=(SMIN, SMAX),
                    steps=args.steps,
                    lr=args.lr,
                    dtype=torch.float64,
                )
                x = S.get_sampler(name)(target, noise * float(fit.sigmas[0]) / SMAX, fit.sigmas)
                err = float((x - exact).norm(dim=1).mean())
                learned.append(
                    {
                        "sampler": name,
                        "error": err,
                        "ratio": err / best["error"],
                        "sigmas": fit.sigmas.tolist(),
                        "fit_seconds": fit.seconds,
                        "heldout_before": fit.heldout_before,
                        "heldout_after": fit.heldout_after,
                    }
                )
                print(f"{tname} nfe={nfe} {name}: {err:.3e} (x{err / best['error']:.3f})")
            top = min(learned, key=lambda r: r["error"])
            results.append(
                {"target": tname, "nfe": nfe, "best_hand_made": best, "hand_made": hand}
                | {"learned": learned, "best_learned": top["sampler"], "ratio": top["ratio"]}
            )
            table_rows.append(
                [tname, nfe, f"{best['sampler']}/{best['grid']}", f"{best['error']:.2e}"]
                + [f"{r['error']:.2e} ({r['ratio']:.2f})" for r in learned]
            )
    header = ["target", "NFE", "best hand-made", "error"]
    header += [f"learned {name} (ratio)" for name in args.samplers]
    note = (
        f"Mean distance to the exact PF-ODE endpoint on {args.n_test} test draws; grids fitted on "
        f"{args.n_fit} other draws ({args.steps} Adam steps, teacher Heun NFE {args.teacher_nfe}). "
        f"k-diffusion: {'included' if ks else 'not installed (our samplers match it to 1e-15)'}."
    )
    payload = {"machine": machine(), "results": results, "seconds": time.time() - t0}
    write_results(
        "learned_grids", args.out, payload, f"{note}\n\n{markdown_table(header, table_rows)}"
    )


if __name__ == "__main__":
    main()
