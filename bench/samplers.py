"""Sampler x grid accuracy on closed-form targets, side by side with k-diffusion (when importable).

    python bench/samplers.py [--n 2000] [--nfe 10 20 35 50] [--threads 1]

Targets: a 16-d Gaussian with eigenvalues log-spaced in [0.01, 4] (exact PF-ODE endpoint known) and
a 2-d ring of 8 Gaussians (reference endpoint from RK45 at rtol = atol = 1e-9). For each NFE budget
it prints every deterministic sampler's mean distance to the exact ODE endpoint on the same noise,
every sampler's distribution distance (Frechet distance to the Gaussian / sliced Wasserstein-2 to
true GMM samples), the best of ours, the best of k-diffusion's samplers on the Karras grid, and the
ratio of the two. Sigma range is EDM's [0.002, 80].
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
import types

import torch
from torch import Tensor

from diffusionlab.diffusion import discretizations as dz
from diffusionlab.diffusion import samplers as S
from diffusionlab.diffusion.analytic import Gaussian, GaussianMixture

SMIN, SMAX = 0.002, 80.0
OURS = [
    ("euler", {}),
    ("heun", {}),
    ("dpmpp_2s", {}),
    ("lms", {}),
    ("plms", {}),
    ("dpmpp_2m", {}),
    ("dpmpp_3m", {}),
    ("unipc", {"order": 2}),
    ("unipc", {"order": 3}),
]
STOCHASTIC = [
    ("ddpm", {}),
    ("euler_ancestral", {}),
    ("edm", {"S_churn": 10.0}),
    ("dpmpp_2m_sde", {}),
    ("dpmpp_3m_sde", {}),
    ("pc", {}),
]
GRIDS = {
    "karras": ("karras", {"rho": 7.0}),
    "karras5": ("karras", {"rho": 5.0}),
    "logsnr": ("logsnr", {}),
}
# k-diffusion sampler, its options, and its NFE cost on n positive sigmas
K_SAMPLERS = [
    ("sample_euler", {}, lambda n: n),
    ("sample_heun", {}, lambda n: 2 * n - 1),
    ("sample_dpm_2", {}, lambda n: 2 * n - 1),
    ("sample_lms", {}, lambda n: n),
    ("sample_dpmpp_2s_ancestral", {"eta": 0.0}, lambda n: 2 * n - 1),
    ("sample_dpmpp_2m", {}, lambda n: n),
    ("sample_dpmpp_3m_sde", {"eta": 0.0}, lambda n: n),
]


def k_sampling() -> types.ModuleType | None:
    """k_diffusion.sampling, also when other k_diffusion modules miss optional deps."""
    try:
        import k_diffusion.sampling as ks

        return ks
    except ImportError:
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None:
            return None
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = pkg
        try:
            import k_diffusion.sampling as ks
        except ImportError:
            return None
        return ks


def sliced_w2(a: Tensor, b: Tensor, n_proj: int = 256) -> float:
    """Sliced Wasserstein-2 between equal-size point clouds (fixed projections)."""
    dirs = torch.randn(
        a.shape[1], n_proj, dtype=a.dtype, generator=torch.Generator().manual_seed(0)
    )
    dirs = dirs / dirs.norm(dim=0)
    pa, pb = (a @ dirs).sort(0).values, (b @ dirs).sort(0).values
    return float((pa - pb).pow(2).mean().sqrt())


def frechet(x: Tensor, mean: Tensor, cov: Tensor) -> float:
    """Frechet (W2) distance between N(mean(x), cov(x)) and N(mean, cov)."""
    mx, cx = x.mean(0), torch.cov(x.T)
    ev, U = torch.linalg.eigh(cov)
    rc = U @ torch.diag(ev.clamp_min(0).sqrt()) @ U.T
    mid = torch.linalg.eigvalsh(rc @ cx @ rc).clamp_min(0).sqrt().sum()
    return float(
        ((mx - mean).pow(2).sum() + cx.trace() + cov.trace() - 2 * mid).clamp_min(0).sqrt()
    )


def analytic_targets(gen: torch.Generator) -> list[tuple[str, GaussianMixture]]:
    """gaussian16 (its eigenbasis drawn from ``gen``) and the tight 2-d ring gmm8ring."""
    d = 16
    evals = torch.logspace(math.log10(0.01), math.log10(4.0), d, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
    gauss = Gaussian(torch.linspace(-1, 1, d, dtype=torch.float64), q @ torch.diag(evals) @ q.T)
    ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = torch.stack([2 * ang.cos(), 2 * ang.sin()], 1)
    gmm = GaussianMixture(torch.ones(8), means, torch.full((8, 2), 0.02, dtype=torch.float64))
    return [("gaussian16", gauss), ("gmm8ring", gmm)]


def exact_endpoint(target: GaussianMixture, x: Tensor) -> Tensor:
    """The PF-ODE endpoint from noise ``x`` at SMAX: closed form for a Gaussian, else RK45 at
    rtol = atol = 1e-9 in float64 down to sigma = 1e-5 and a final denoising step."""
    if isinstance(target, Gaussian):
        return target.ode_solution(x, SMAX, 0.0)
    return S.get_sampler("rk45", rtol=1e-9, atol=1e-9)(target, x, torch.tensor([SMAX, 1e-5, 0.0]))


def targets(n: int) -> list[tuple[str, GaussianMixture, Tensor, Tensor]]:
    """(name, target, noise scaled to SMAX, reference ODE endpoint)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for name, target in analytic_targets(gen):
        x = torch.randn(n, target.dim, dtype=torch.float64, generator=gen) * SMAX
        out.append((name, target, x, exact_endpoint(target, x)))
    return out


def distance(name: str, target: GaussianMixture, x: Tensor, true: Tensor) -> float:
    if name.startswith("gaussian"):
        return frechet(x, target.means[0], target.covs[0])
    return sliced_w2(x, true)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="samples per run")
    ap.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 35, 50])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny tensors)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ks = k_sampling()
    t0 = time.time()
    print(f"k-diffusion: {'found' if ks else 'not importable (ours only)'}; n = {args.n}")
    headline = []
    for tname, target, noise, ref in targets(args.n):
        true = target.sample(args.n, torch.Generator().manual_seed(1))
        floor = distance(
            tname, target, target.sample(args.n, torch.Generator().manual_seed(2)), true
        )
        print(f"\n## {tname}  (distance floor of two true sample sets: {floor:.4f})")
        for nfe in args.nfe:
            rows = []
            for name, opts in OURS + STOCHASTIC:
                label = name + "".join(f"_{k}{v:g}" for k, v in opts.items())
                for grid, (gname, gopts) in GRIDS.items():
                    n_steps = S.steps_for_nfe(name, nfe, **opts)
                    sig = dz.get_sigmas(gname, n_steps, sigma_min=SMIN, sigma_max=SMAX, **gopts)
                    smp = S.get_sampler(name, **opts)
                    x = smp(target, noise, sig, generator=torch.Generator().manual_seed(3))
                    err = float((x - ref).norm(dim=1).mean()) if not smp.stochastic else math.nan
                    rows.append(
                        ("ours", f"{label}/{grid}", smp.nfe, err, distance(tname, target, x, true))
                    )
            if ks is not None:
                for kname, kopts, cost in K_SAMPLERS:
                    n_steps = max(k for k in range(1, nfe + 1) if cost(k) <= nfe)
                    sig = dz.karras(n_steps, SMIN, SMAX)
                    x = getattr(ks, kname)(target, noise, sig, disable=True, **kopts)
                    err = float((x - ref).norm(dim=1).mean())
                    rows.append(
                        (
                            "k-diff",
                            f"{kname[7:]}/karras",
                            cost(n_steps),
                            err,
                            distance(tname, target, x, true),
                        )
                    )
            print(
                f"\nNFE {nfe}: {'who':7s} {'sampler/grid':34s} {'nfe':>4s} {'ODE err':>10s} {'dist':>8s}"
            )
            for who, label, used, err, dist in sorted(
                rows, key=lambda r: (math.isnan(r[3]), r[3], r[4])
            ):
                print(f"        {who:7s} {label:34s} {used:4d} {err:10.3e} {dist:8.4f}")
            det = [r for r in rows if not math.isnan(r[3])]
            ours = min((r for r in det if r[0] == "ours"), key=lambda r: r[3])
            line = f"{tname:10s} NFE {nfe:2d}: ours {ours[1]} {ours[3]:.2e}"
            if ks is not None:
                theirs = min((r for r in det if r[0] == "k-diff"), key=lambda r: r[3])
                line += f" | k-diff {theirs[1]} {theirs[3]:.2e} | ratio {ours[3] / theirs[3]:.3f}"
            headline.append(line)
    print("\n## Best deterministic sampler+grid per budget (ODE error; ratio = ours / k-diffusion)")
    print("\n".join(headline))
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
