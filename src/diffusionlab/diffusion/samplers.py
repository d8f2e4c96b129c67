"""Samplers in EDM's sigma-space: integrate dx~/dsigma = (x~ - D(x~; sigma)) / sigma or its SDE.

Every sampler has one signature, ``sampler(denoise, x, sigmas, *, generator=None, callback=None)``:
``denoise(x, sigma)`` returns D(x; sigma) for a batch and a per-sample ``[B]`` sigma, ``x`` is noise
already scaled to ``sigmas[0]``, ``sigmas`` is strictly decreasing and ends at 0. The callback gets
``{'i', 'sigma', 'x', 'denoised', 'nfe'}`` after each network evaluation that starts a step, and
``sampler.nfe`` holds the exact count of the last run. ``flow_map`` also hands ``denoise`` the
step's end as ``sigma_end=`` when it takes that keyword (a flow-map model's ``Denoiser``). All
noise comes from :func:`diffusionlab.diffusion.noise.randn_like`, so per-sample generators give
batch-independent samples. A grid that requires grad reaches the samplers as 0-d tensors, so every deterministic
sampler's output is differentiable in the sigmas (learned grids, ``grid_fit.py``).

Each sampler is registered by :func:`register_sampler` with its facts in one record
(:class:`SamplerInfo`): the step loop, its cost model and whether it draws noise. Cost (NFE for a
grid of N positive sigmas): one evaluation per step for most samplers; 2N - 1 for Heun-type ones
(the last step to 0 is Euler); N + 1 for PLMS; (1 + n_corrector) N for predictor-corrector;
T N (+ 1) for annealed Langevin; adaptive for RK45.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffusionlab.diffusion import discretizations
from diffusionlab.diffusion.iddpm import learned_log_variance
from diffusionlab.diffusion.noise import Generator, randn_like

Denoise = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None]
Scalar = float | Tensor  # a sigma: a float, or a 0-d tensor when the grid is differentiated


def _log(v: Scalar) -> Scalar:
    return v.log() if isinstance(v, Tensor) else math.log(v)


def _exp(v: Scalar) -> Scalar:
    return v.exp() if isinstance(v, Tensor) else math.exp(v)


def _expm1(v: Scalar) -> Scalar:
    return v.expm1() if isinstance(v, Tensor) else math.expm1(v)


def _takes_end(denoise: Denoise) -> bool:
    """Whether ``denoise`` (a module: its ``forward``) takes ``sigma_end`` or any keyword."""
    fn = denoise.forward if isinstance(denoise, torch.nn.Module) else denoise
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD or p.name == "sigma_end" for p in params)


class _Model:
    """Counts NFE, broadcasts a float sigma to ``[B]`` and forwards step info to the callback."""

    def __init__(self, denoise: Denoise, callback: Callback | None) -> None:
        self.denoise, self.callback, self.nfe = denoise, callback, 0
        self.takes_end = _takes_end(denoise)

    def __call__(self, x: Tensor, sigma: float, sigma_end: float | None = None) -> Tensor:
        """D(x; sigma), or a flow map's D(x; sigma, sigma_end) (``FlowMapParam``) when
        ``denoise`` takes that keyword (a ``Denoiser`` and the generator's closures do)."""
        self.nfe += 1
        if sigma_end is None or not self.takes_end:
            return self.denoise(x, self._batch(x, sigma))
        return self.denoise(x, self._batch(x, sigma), sigma_end=self._batch(x, sigma_end))

    @staticmethod
    def _batch(x: Tensor, sigma: float) -> Tensor:
        if isinstance(sigma, Tensor):  # a differentiated grid: keep sigma in the graph
            return sigma.to(x.dtype).expand(x.shape[0])
        return x.new_full((x.shape[0],), sigma)

    def report(self, i: int, sigma: float, x: Tensor, denoised: Tensor) -> None:
        if self.callback is not None:
            self.callback({"i": i, "sigma": sigma, "x": x, "denoised": denoised, "nfe": self.nfe})


# ----------------------------------------------------------------------------- registry
Options = Mapping[str, Any]


@dataclass(frozen=True)
class Cost:
    """A sampler's cost model: ``nfe(n, options)`` network evaluations on a grid of ``n``
    positive sigmas (None: adaptive), and ``steps(nfe, options)``, the most positive sigmas a
    budget of ``nfe >= 1`` evaluations pays for."""

    nfe: Callable[[int, Options], int | None]
    steps: Callable[[int, Options], int]


ONE_PER_STEP = Cost(lambda n, o: n, lambda nfe, o: nfe)
# Heun-type: two evaluations per step, one for the last step (to sigma = 0, Euler)
TWO_PER_STEP = Cost(lambda n, o: 2 * n - 1, lambda nfe, o: (nfe + 1) // 2)


def never(options: Options) -> bool:
    """A deterministic sampler: it draws no noise whatever its options."""
    return False


def always(options: Options) -> bool:
    """A sampler that draws noise whatever its options."""
    return True


def draws_noise(option: str, default: float) -> Callable[[Options], bool]:
    """Stochastic while ``options[option]`` (``default`` when unset) is > 0: eta, S_churn."""
    return lambda options: float(options.get(option, default)) > 0


@dataclass(frozen=True)
class SamplerInfo:
    """One registered sampler: its step loop ``fn(m, x, sig, gen, **options)``, its cost model
    and whether it draws noise with given options."""

    name: str
    fn: Callable[..., Tensor]
    cost: Cost
    stochastic: Callable[[Options], bool]

    @property
    def option_names(self) -> list[str]:
        """The options ``fn`` takes (its keyword parameters after ``m, x, sig, gen``)."""
        params = inspect.signature(self.fn).parameters
        return [p for p in params if p not in ("m", "x", "sig", "gen")]


SAMPLERS: dict[str, SamplerInfo] = {}


def register_sampler(
    cost: Cost = ONE_PER_STEP, stochastic: Callable[[Options], bool] = never
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator: register the sampler ``fn`` under its function name, with its cost model and
    its noise predicate. A new sampler is one decorated function (and its ``conf/sampler`` YAML)."""

    def register(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if fn.__name__ in SAMPLERS:
            raise ValueError(f"sampler {fn.__name__!r} is registered twice")
        SAMPLERS[fn.__name__] = SamplerInfo(fn.__name__, fn, cost, stochastic)
        return fn

    return register


def sampler_info(name: str) -> SamplerInfo:
    """The registered sampler ``name``; a ValueError lists the valid names."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


# ----------------------------------------------------------------------------- first order, Heun
@register_sampler()
def euler(m: _Model, x: Tensor, sig: list[float], gen: Generator) -> Tensor:
    """Euler on the probability-flow ODE (EDM eq. 4); equals DDIM(eta=0) and DPM-Solver++ 1."""
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        den = m(x, s)
        m.report(i, s, x, den)
        x = x + (sn - s) / s * (x - den)
    return x


@register_sampler(TWO_PER_STEP)
def heun(m: _Model, x: Tensor, sig: list[float], gen: Generator) -> Tensor:
    """EDM Alg. 1: deterministic Heun (2nd order), 2N - 1 NFE."""
    return edm(m, x, sig, gen)


@register_sampler(TWO_PER_STEP, draws_noise("S_churn", 0.0))
def edm(
    m: _Model,
    x: Tensor,
    sig: list[float],
    gen: Generator,
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float = float("inf"),
    S_noise: float = 1.0,
    noise_every_step: bool = False,
) -> Tensor:
    """EDM Alg. 2: Heun's 2nd-order method with optional churn (stochastic when S_churn > 0);
    the last step to sigma = 0 is Euler, so N steps cost 2N - 1 NFE. Churn noise is drawn where
    it is added (as EDM2's sampler); ``noise_every_step`` draws it at every step, also where
    gamma = 0, as EDM's generate.py does, so each seed's noise stream and image equal EDM's."""
    n = len(sig) - 1
    for i in range(n):
        s, sn = sig[i], sig[i + 1]
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_tmin <= s <= S_tmax else 0.0
        s_hat = s + gamma * s
        if gamma > 0:
            x = x + math.sqrt(s_hat**2 - s**2) * S_noise * randn_like(x, gen)
        elif noise_every_step:
            randn_like(x, gen)  # drawn and unused, as EDM's x + 0 * noise
        den = m(x, s_hat)
        m.report(i, s_hat, x, den)
        d = (x - den) / s_hat
        x_next = x + (sn - s_hat) * d
        if sn > 0:
            d2 = (x_next - m(x_next, sn)) / sn
            x_next = x + (sn - s_hat) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x


@register_sampler(stochastic=draws_noise("eta", 0.0))
def ddim(m: _Model, x: Tensor, sig: list[float], gen: Generator, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) in sigma-space; eta=0 is Euler, eta=1 is DDPM ancestral."""
    return euler_ancestral(m, x, sig, gen, eta=eta)


@register_sampler(stochastic=always)
def ddpm(
    m: _Model,
    x: Tensor,
    sig: list[float],
    gen: Generator,
    variance: str = "small",
    clip_denoised: bool = False,
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, eq. 6-7): mean of the forward posterior
    q(x~_next | x~, x0 = D) = D + (sn/s)^2 (x~ - D), plus noise of variance
    ``small`` = beta-tilde (the posterior's, sn^2 (s^2 - sn^2) / s^2) or ``large`` = beta_t
    ((s^2 - sn^2)(1 + sn^2) / (1 + s^2) in x~ units, VP schedules), or ``learned``: iDDPM's
    interpolation of the two logs by the network's variance output (Nichol & Dhariwal 2021
    eq. 15), read from D's ``learned_variance`` (parameterization.learned_variance=true). On a
    respaced grid beta_t and beta-tilde are those of the respaced steps (iDDPM sec. 4).
    ``clip_denoised`` clamps D to the data range [-1, 1] before the step, as DDPM's and iDDPM's
    samplers do (``clip_denoised=True``): an eps-prediction's D = x~ - sigma eps is far off at
    the large sigmas of discrete VP schedules (cosine: up to 2e4)."""
    if variance not in ("small", "large", "learned"):
        raise ValueError(f"ddpm variance must be 'small', 'large' or 'learned', got {variance!r}")
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        den = m(x, s)
        m.report(i, s, x, den)
        v = getattr(den, "learned_variance", None)
        if variance == "learned" and v is None:
            raise ValueError(
                "ddpm variance='learned' needs a denoiser with a learned variance "
                "(parameterization.learned_variance=true)"
            )
        if clip_denoised:
            den = den.clamp(-1.0, 1.0)
        x = den + (sn / s) ** 2 * (x - den)
        if sn > 0:
            small = sn**2 * (s**2 - sn**2) / s**2
            large = (s**2 - sn**2) * (1 + sn**2) / (1 + s**2)
            if variance == "learned":
                std = (0.5 * learned_log_variance(v, math.log(small), math.log(large))).exp()
            else:
                std = math.sqrt(small if variance == "small" else large)
            x = x + randn_like(x, gen) * std
    return x


def _ancestral_step(s: float, sn: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) with sigma_up^2 = eta^2 sn^2 (s^2 - sn^2) / s^2 (DDIM eq. 16)."""
    if eta == 0:
        return sn, 0.0
    up = min(sn, eta * math.sqrt(max(sn**2 * (s**2 - sn**2) / s**2, 0.0)))
    return math.sqrt(max(sn**2 - up**2, 0.0)), up


@register_sampler(stochastic=draws_noise("eta", 1.0))
def euler_ancestral(
    m: _Model, x: Tensor, sig: list[float], gen: Generator, eta: float = 1.0, s_noise: float = 1.0
) -> Tensor:
    """Euler down to sigma_down, then fresh noise of std sigma_up. In sigma-space this *is*
    DDIM with ``eta`` (DDIM eq. 12 with x~ = x / sqrt(alpha_bar)) for any schedule."""
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        den = m(x, s)
        m.report(i, s, x, den)
        down, up = _ancestral_step(s, sn, eta)
        x = x + (down - s) / s * (x - den)
        if sn > 0 and up > 0:
            x = x + randn_like(x, gen) * (s_noise * up)
    return x


@register_sampler(stochastic=always)
def euler_maruyama(m: _Model, x: Tensor, sig: list[float], gen: Generator) -> Tensor:
    """Euler-Maruyama on the reverse SDE dx = -2 sigma score dsigma + sqrt(2 sigma) dW
    (EDM eq. 6 with beta = sigma'/sigma, i.e. Song et al. 2021's reverse VE SDE); the last
    step to sigma = 0 returns the denoised mean."""
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        den = m(x, s)
        m.report(i, s, x, den)
        if sn == 0:
            x = den
        else:
            x = x + 2 * (s - sn) / s * (den - x) + randn_like(x, gen) * math.sqrt(2 * s * (s - sn))
    return x


@register_sampler(stochastic=always)
def consistency(
    m: _Model, x: Tensor, sig: list[float], gen: Generator, sigma_min: float = 0.002
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1) for a consistency model f
    (parameterization=consistency), which ``denoise`` is: x0 = f(x; sigma_0), then at each
    further positive sigma s, re-noise x = x0 + sqrt(s^2 - sigma_min^2) z and map back,
    x0 = f(x; s). One NFE per positive sigma; one step draws no noise. ``sigma_min`` is the
    model's boundary (``parameterization.sigma_min``). Not an ODE or SDE solver: on a diffusion
    denoiser it returns posterior means, not samples."""
    den = x
    for i in range(len(sig) - 1):
        s = sig[i]
        if i > 0:
            var = s**2 - sigma_min**2
            std = var.clamp_min(0).sqrt() if isinstance(var, Tensor) else math.sqrt(max(var, 0))
            x = den + randn_like(den, gen) * std
        den = m(x, s)
        m.report(i, s, x, den)
    return den


@register_sampler()
def flow_map(m: _Model, x: Tensor, sig: list[float], gen: Generator) -> Tensor:
    """Flow-map sampling (MeanFlow, Geng et al. 2025, Alg. 2: z_r = z_t - (t - r) u(z_t, r, t)):
    x <- Phi(x; s -> s') = x + (s' - s) / s (x - D(x; s, s')), one NFE per step, for a model
    whose D knows where its step ends (``parameterization=flow_map``): the PF-ODE's solution in
    one evaluation. On a one-time denoiser it is Euler's method."""
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        den = m(x, s, sn)
        m.report(i, s, x, den)
        x = x + (sn - s) / s * (x - den)
    return x


def _langevin_costs(options: Options) -> tuple[int, int]:
    """(T steps per level, 1 if the final denoising step is on) of annealed Langevin."""
    steps = int(options.get("steps_per_level", 100))
    if steps < 1:
        raise ValueError(f"annealed_langevin steps_per_level must be >= 1, got {steps}")
    return steps, int(bool(options.get("final_denoise", True)))


def _langevin_nfe(n: int, options: Options) -> int:
    steps, final = _langevin_costs(options)
    return steps * n + final


def _langevin_levels(nfe: int, options: Options) -> int:
    steps, final = _langevin_costs(options)
    if nfe < steps + final:
        raise ValueError(
            f"sampler 'annealed_langevin' with steps_per_level={steps} and "
            f"final_denoise={bool(final)} needs nfe >= {steps + final} (levels x steps (+ 1))"
        )
    return (nfe - final) // steps


@register_sampler(Cost(_langevin_nfe, _langevin_levels), always)
def annealed_langevin(
    m: _Model,
    x: Tensor,
    sig: list[float],
    gen: Generator,
    steps_per_level: int = 100,
    eps: float = 2e-5,
    final_denoise: bool = True,
) -> Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1): the positive sigmas are the noise
    levels sigma_1 > ... > sigma_L; at level i, ``steps_per_level`` (T) steps
    x <- x + alpha_i / 2 * score + sqrt(alpha_i) z with alpha_i = eps sigma_i^2 / sigma_L^2 and
    score = (D(x; sigma_i) - x) / sigma_i^2. ``final_denoise`` returns D(x; sigma_L) (Tweedie's
    formula, Jolicoeur-Martineau et al. 2021), one more NFE: L T (+ 1) in all. Stable while
    eps / sigma_L^2 < 4 (for a target of variance >= sigma^2)."""
    levels = sig[:-1]
    last = levels[-1]
    for i, s in enumerate(levels):
        alpha = eps * s**2 / last**2
        for k in range(int(steps_per_level)):
            den = m(x, s)
            if k == 0:
                m.report(i, s, x, den)
            x = x + 0.5 * alpha * (den - x) / s**2 + randn_like(x, gen) * math.sqrt(alpha)
    return m(x, last) if final_denoise else x


# ----------------------------------------------------------------------------- DPM-Solver++
@register_sampler(stochastic=draws_noise("eta", 0.0))
def dpmpp_2m(
    m: _Model,
    x: Tensor,
    sig: list[float],
    gen: Generator,
    eta: float = 0.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in lambda = -log sigma; with eta > 0 the
    SDE-DPM-Solver++(2M) of the same paper (eq. 18-19). ``solver_type``: midpoint or heun."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    old, h_last = None, None
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        den = m(x, s)
        m.report(i, s, x, den)
        if sn == 0:
            x = den
            continue
        h = _log(s / sn)
        eh = h * (1 + eta)
        phi = -_expm1(-eh)
        x = (sn / s) * _exp(-eta * h) * x + phi * den
        if old is not None:
            r = h_last / h
            coef = 0.5 * phi if solver_type == "midpoint" else (1 - phi / eh)
            x = x + coef / r * (den - old)
        if eta > 0:
            x = x + randn_like(x, gen) * (sn * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise)
        old, h_last = den, h
    return x


@register_sampler(stochastic=draws_noise("eta", 1.0))
def dpmpp_2m_sde(
    m: _Model,
    x: Tensor,
    sig: list[float],
    gen: Generator,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, eq. 18-19)."""
    return dpmpp_2m(m, x, sig, gen, eta=eta, s_noise=s_noise, solver_type=solver_type)


@register_sampler(stochastic=draws_noise("eta", 0.0))
def dpmpp_3m(
    m: _Model, x: Tensor, sig: list[float], gen: Generator, eta: float = 0.0, s_noise: float = 1.0
) -> Tensor:
    """DPM-Solver++(3M): 3rd-order multistep in lambda (Lu et al. 2022, Appendix; exponential
    integrator with phi_2, phi_3); ``eta`` > 0 adds the SDE variant's noise."""
    d1 = d2 = h1 = h2 = None
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        den = m(x, s)
        m.report(i, s, x, den)
        if sn == 0:
            x = den
            continue
        h = _log(s / sn)
        he = h * (eta + 1)
        x = _exp(-he) * x - _expm1(-he) * den
        phi2 = _expm1(-he) / he + 1
        if h2 is not None:
            r0, r1 = h1 / h, h2 / h
            dd0 = (den - d1) / r0
            dd1 = (d1 - d2) / r1
            x = (
                x
                + phi2 * (dd0 + (dd0 - dd1) * r0 / (r0 + r1))
                - (phi2 / he - 0.5) * (dd0 - dd1) / (r0 + r1)
            )
        elif h1 is not None:
            x = x + phi2 * (den - d1) / (h1 / h)
        if eta > 0:
            x = x + randn_like(x, gen) * (sn * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise)
        d1, d2, h1, h2 = den, d1, h, h1
    return x


@register_sampler(stochastic=draws_noise("eta", 1.0))
def dpmpp_3m_sde(
    m: _Model, x: Tensor, sig: list[float], gen: Generator, eta: float = 1.0, s_noise: float = 1.0
) -> Tensor:
    """SDE-DPM-Solver++(3M)."""
    return dpmpp_3m(m, x, sig, gen, eta=eta, s_noise=s_noise)


@register_sampler(TWO_PER_STEP, draws_noise("eta", 0.0))
def dpmpp_2s(
    m: _Model, x: Tensor, sig: list[float], gen: Generator, eta: float = 0.0, s_noise: float = 1.0
) -> Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022, Alg. 1, r = 1/2); ``eta`` > 0 makes it ancestral.
    Two NFE per step except the last to sigma = 0: 2N - 1 NFE."""
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        den = m(x, s)
        m.report(i, s, x, den)
        down, up = _ancestral_step(s, sn, eta)
        if down == 0:
            x = den
        else:
            h = _log(s / down)
            s_mid = s * _exp(-0.5 * h)
            x2 = (s_mid / s) * x - _expm1(-0.5 * h) * den
            x = (down / s) * x - _expm1(-h) * m(x2, s_mid)
        if sn > 0 and up > 0:
            x = x + randn_like(x, gen) * (s_noise * up)
    return x


@register_sampler(TWO_PER_STEP, draws_noise("eta", 1.0))
def dpmpp_2s_ancestral(
    m: _Model, x: Tensor, sig: list[float], gen: Generator, eta: float = 1.0, s_noise: float = 1.0
) -> Tensor:
    """Ancestral DPM-Solver++(2S)."""
    return dpmpp_2s(m, x, sig, gen, eta=eta, s_noise=s_noise)


# ----------------------------------------------------------------------------- UniPC
def _unipc_system(
    h: Scalar, rks: list[Scalar], order: int, variant: str
) -> tuple[Scalar, Scalar, list[list[Scalar]], list[Scalar]]:
    """phi_1, B(h) and the order conditions R rho = b of UniPC (Zhao et al. 2023, Alg. 2-3,
    data prediction)."""
    hh = -h
    phi1 = _expm1(hh)
    phik = phi1 / hh - 1
    bh = hh if variant == "bh1" else _expm1(hh)
    fac, R, b = 1, [], []
    for k in range(1, order + 1):
        R.append([r ** (k - 1) for r in rks])
        b.append(phik * fac / bh)
        fac *= k + 1
        phik = phik / hh - 1 / fac
    return phi1, bh, R, b


def _solve(R: list[list[Scalar]], b: list[Scalar]) -> list[Scalar]:
    """rho with R rho = b (UniPC's coefficients); through torch when the sigmas are tensors."""
    if not any(isinstance(v, Tensor) for v in [*b, *(v for row in R for v in row)]):
        return np.linalg.solve(np.array(R), np.array(b)).tolist()

    def vec(row: list[Scalar]) -> Tensor:
        return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in row])

    return list(torch.linalg.solve(torch.stack([vec(r) for r in R]), vec(b)).unbind())


@register_sampler()
def unipc(
    m: _Model,
    x: Tensor,
    sig: list[float],
    gen: Generator,
    order: int = 3,
    variant: str = "bh2",
    corrector: bool = True,
) -> Tensor:
    """UniPC (Zhao et al. 2023): UniP-p predictor + UniC corrector on data prediction, in
    lambda = -log sigma, with lower-order warm-up and final steps. The corrector reuses the
    model output at the predicted point, so one NFE per step."""
    if order not in (1, 2, 3):
        raise ValueError(f"unipc order must be 1, 2 or 3, got {order}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unipc variant must be 'bh1' or 'bh2', got {variant!r}")
    n = len(sig) - 1
    lam = [-_log(s) for s in sig[:-1]]
    hist: list[Tensor] = []  # model outputs, newest last
    x_last, p_last = x, 0
    for i in range(n):
        s, sn = sig[i], sig[i + 1]
        den = m(x, s)
        m.report(i, s, x, den)
        if corrector and i > 0 and sn > 0:  # the last step returns den, uncorrected
            h = lam[i] - lam[i - 1]
            rks = [(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, p_last)] + [1.0]
            phi1, bh, R, b = _unipc_system(h, rks, p_last, variant)
            rho = [0.5] if p_last == 1 else _solve(R, b)
            m0 = hist[-1]
            res = sum(
                (rho[k - 1] * (hist[-1 - k] - m0) / rks[k - 1] for k in range(1, p_last)),
                rho[-1] * (den - m0),
            )
            x = (s / sig[i - 1]) * x_last - phi1 * m0 - bh * res
        hist = (hist + [den])[-order:]
        p = min(order, i + 1, n - i)
        x_last, p_last = x, p
        if sn == 0:
            x = den
            continue
        h = _log(s / sn)
        rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)] + [1.0]
        phi1, bh, R, b = _unipc_system(h, rks, p, variant)
        x = (sn / s) * x - phi1 * den
        if p > 1:
            rho = [0.5] if p == 2 else _solve([r[:-1] for r in R[:-1]], b[:-1])
            x = x - bh * sum(rho[k - 1] * (hist[-1 - k] - den) / rks[k - 1] for k in range(1, p))
    return x


# ----------------------------------------------------------------------------- multistep
def _lms_coeff(order: int, t: list[Scalar], i: int, j: int) -> Scalar:
    """Integral over [t_i, t_{i+1}] of the Lagrange basis polynomial of node t_{i-j}, by
    ``order``-point Gauss-Legendre quadrature (exact: the polynomial has degree order - 1)."""
    nodes, weights = (v.tolist() for v in np.polynomial.legendre.leggauss(order))
    half, mid = (t[i + 1] - t[i]) / 2, (t[i + 1] + t[i]) / 2
    total = 0.0
    for node, weight in zip(nodes, weights, strict=True):
        tau, basis = mid + half * node, 1.0
        for k in range(order):
            if k != j:
                basis = basis * (tau - t[i - k]) / (t[i - j] - t[i - k])
        total = total + weight * basis
    return total * half


@register_sampler()
def lms(m: _Model, x: Tensor, sig: list[float], gen: Generator, order: int = 4) -> Tensor:
    """Linear multistep in sigma (k-diffusion's LMS): Adams-Bashforth with exact integrals of
    the Lagrange polynomials through the last ``order`` derivatives on the uneven grid."""
    ds: list[Tensor] = []
    for i in range(len(sig) - 1):
        s = sig[i]
        den = m(x, s)
        m.report(i, s, x, den)
        ds = (ds + [(x - den) / s])[-order:]
        p = len(ds)
        x = x + sum(_lms_coeff(p, sig, i, j) * d for j, d in enumerate(reversed(ds)))
    return x


# a Heun first step: N + 1 evaluations
@register_sampler(
    Cost(lambda n, o: n + 1 if n > 1 else 1, lambda nfe, o: nfe - 1 if nfe >= 3 else 1)
)
def plms(m: _Model, x: Tensor, sig: list[float], gen: Generator) -> Tensor:
    """PLMS / PNDM (Liu et al. 2022, eq. 12 as in LDM): 4th-order Adams-Bashforth on
    eps = (x - D) / sigma with the equal-step coefficients, a Heun first step; N + 1 NFE."""
    ds: list[Tensor] = []
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        den = m(x, s)
        m.report(i, s, x, den)
        d = (x - den) / s
        if not ds:
            dp = d
            if sn > 0:
                x2 = x + (sn - s) * d
                dp = 0.5 * (d + (x2 - m(x2, sn)) / sn)
        elif len(ds) == 1:
            dp = (3 * d - ds[-1]) / 2
        elif len(ds) == 2:
            dp = (23 * d - 16 * ds[-1] + 5 * ds[-2]) / 12
        else:
            dp = (55 * d - 59 * ds[-1] + 37 * ds[-2] - 9 * ds[-3]) / 24
        ds = (ds + [d])[-3:]
        x = x + (sn - s) * dp
    return x


# ----------------------------------------------------------------------------- SDE / PC / RK45
def _pc_per_step(options: Options) -> int:
    return 1 + int(options.get("n_corrector", 1))


def _pc_steps(nfe: int, options: Options) -> int:
    per = _pc_per_step(options)
    if nfe < per:
        raise ValueError(f"sampler 'pc' with n_corrector={per - 1} needs nfe >= {per}")
    return nfe // per


@register_sampler(Cost(lambda n, o: _pc_per_step(o) * n, _pc_steps), always)
def pc(
    m: _Model,
    x: Tensor,
    sig: list[float],
    gen: Generator,
    snr: float = 0.16,
    n_corrector: int = 1,
) -> Tensor:
    """Predictor-corrector (Song et al. 2021, Alg. 1-2): ``n_corrector`` Langevin steps with
    step 2 (snr |z| / |score|)^2 (norms averaged over the batch as in score_sde, so
    unlike the other samplers its output depends on the batch), then the reverse-diffusion
    predictor x + (s^2 - sn^2) score + sqrt(s^2 - sn^2) z; the last step returns its mean."""
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        for _ in range(n_corrector):
            den = m(x, s)
            grad = (den - x) / s**2
            z = randn_like(x, gen)
            gnorm = float(grad.flatten(1).norm(dim=1).mean().clamp_min(1e-30))
            znorm = float(z.flatten(1).norm(dim=1).mean())
            step = 2 * (snr * znorm / gnorm) ** 2
            x = x + step * grad + math.sqrt(2 * step) * z
        den = m(x, s)
        m.report(i, s, x, den)
        x = x + (1 - (sn / s) ** 2) * (den - x)
        if sn > 0:
            x = x + randn_like(x, gen) * math.sqrt(s**2 - sn**2)
    return x


_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


# adaptive: the cost depends on the solution; the grid is the two end points
@register_sampler(Cost(lambda n, o: None, lambda nfe, o: 2))
def rk45(
    m: _Model,
    x: Tensor,
    sig: list[float],
    gen: Generator,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    first_step: float = 0.1,
) -> Tensor:
    """Adaptive Dormand-Prince RK45 on the probability-flow ODE in u = log sigma,
    dx/du = x - D(x, e^u) (Song et al. 2021's black-box ODE sampler), from ``sigmas[0]`` to the
    last positive sigma, then one denoising step to 0. One step size for the whole batch."""
    u, u_end = math.log(sig[0]), math.log(sig[-2])
    h = -min(first_step, u - u_end) if u > u_end else 0.0
    k1 = x - m(x, math.exp(u)) if u > u_end else None
    step = 0
    while u > u_end + 1e-12:
        h = max(h, u_end - u)
        ks = [k1]
        for a in _DP_A[1:]:
            xi = x + h * sum(c * k for c, k in zip(a, ks, strict=True) if c != 0.0)
            ks.append(xi - m(xi, math.exp(u + h * _DP_C[len(ks)])))
        x_new = xi
        err = h * sum(e * k for e, k in zip(_DP_E, ks, strict=True) if e != 0.0)
        scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
        e = float((err / scale).pow(2).mean().sqrt())
        if e <= 1.0:
            u, x, k1 = u + h, x_new, ks[-1]
            m.report(step, math.exp(u), x, x - k1)
            step += 1
        h = h * min(5.0, max(0.2, 0.9 * (max(e, 1e-10) ** -0.2)))
    return m(x, sig[-2])


# ----------------------------------------------------------------------------- costs, checks
def nfe_for_steps(name: str, n: int, **options: Any) -> int | None:
    """Exact NFE of sampler ``name`` on a grid of ``n`` positive sigmas (None: adaptive)."""
    return sampler_info(name).cost.nfe(n, options)


def steps_for_nfe(name: str, nfe: int, **options: Any) -> int:
    """Largest number of positive sigmas whose cost is <= ``nfe`` (RK45 is adaptive: it gets
    the two end points sigma_max, sigma_min)."""
    info = sampler_info(name)
    if int(nfe) < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    return info.cost.steps(int(nfe), options)


def check_sigmas(sigmas: Tensor) -> None:
    """Raise ValueError unless ``sigmas`` is 1-D, strictly decreasing, positive and ends at 0."""
    sigmas = sigmas.detach() if isinstance(sigmas, Tensor) else sigmas
    ok = (
        isinstance(sigmas, Tensor)
        and sigmas.dim() == 1
        and len(sigmas) >= 2
        and bool(torch.isfinite(sigmas).all())
        and float(sigmas[-1]) == 0.0
        and bool((sigmas[:-1] > 0).all())
        and bool((sigmas.diff() < 0).all())
    )
    if not ok:
        raise ValueError(
            "sigmas must be a strictly decreasing 1-D tensor of positive values that ends at 0, "
            f"got {sigmas!r}"
        )


class Sampler:
    """A configured sampler: ``sampler(denoise, x, sigmas, *, generator=None, callback=None)``."""

    def __init__(self, name: str, **options: Any) -> None:
        info = sampler_info(name)
        valid = info.option_names
        bad = sorted(set(options) - set(valid))
        if bad:
            raise ValueError(
                f"sampler {name!r} got unknown options {bad}; valid: {', '.join(valid) or 'none'}"
            )
        self.info, self.name, self.options, self.fn, self.nfe = (
            info,
            name,
            dict(options),
            info.fn,
            0,
        )

    @property
    def stochastic(self) -> bool:
        """Whether the sampler draws noise with its current options."""
        return self.info.stochastic(self.options)

    @property
    def adaptive(self) -> bool:
        """Whether it picks its own steps (RK45): its cost is not fixed by the grid."""
        return self.info.cost.nfe(1, self.options) is None

    def __call__(
        self,
        denoise: Denoise,
        x: Tensor,
        sigmas: Tensor,
        *,
        generator: Generator = None,
        callback: Callback | None = None,
    ) -> Tensor:
        check_sigmas(sigmas)
        m = _Model(denoise, callback)
        # a grid that requires grad stays a list of 0-d tensors, so the output is differentiable
        sig = list(sigmas.unbind()) if sigmas.requires_grad else sigmas.tolist()
        out = self.fn(m, x, sig, generator, **self.options)
        self.nfe = m.nfe
        return out

    def steps(
        self,
        denoise: Denoise,
        x: Tensor,
        sigmas: list[float],
        *,
        generator: Generator = None,
    ) -> Tensor:
        """The step loop on a partial grid of decreasing positive ``sigmas`` that need not end at
        0: ``x`` at sigmas[0] carried to sigmas[-1] (one teacher step of consistency
        distillation). Samplers that do not walk their grid step by step (RK45 integrates to
        the last positive sigma and denoises; annealed Langevin and consistency sampling have
        no trajectory) refuse."""
        if self.name in PARTIAL_GRID_REFUSED:
            raise ValueError(
                f"sampler {self.name!r} cannot step between two noise levels; use one of "
                f"{', '.join(n for n in SAMPLERS if n not in PARTIAL_GRID_REFUSED)}"
            )
        if any(float(s) <= 0 for s in sigmas) or any(
            float(a) <= float(b) for a, b in zip(sigmas[:-1], sigmas[1:], strict=False)
        ):
            raise ValueError(f"a partial grid must be decreasing and positive, got {sigmas}")
        m = _Model(denoise, None)
        out = self.fn(m, x, [float(s) for s in sigmas], generator, **self.options)
        self.nfe = m.nfe
        return out

    def __repr__(self) -> str:
        return f"Sampler({self.name!r}, {self.options})"


# samplers without a step loop between two noise levels (``Sampler.steps``)
PARTIAL_GRID_REFUSED = ("rk45", "annealed_langevin", "consistency")


def get_sampler(name: str, **options: Any) -> Sampler:
    """The sampler called ``name`` (one of :data:`SAMPLERS`) with its ``options``."""
    return Sampler(name, **options)


def sigmas_for_nfe(
    schedule: Any,
    sampler_name: str,
    nfe: int,
    discretization: str = "karras",
    *,
    options: dict[str, Any] | None = None,
    snap: bool = False,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    **kw: Any,
) -> Tensor:
    """The sigma grid (ending at 0) that spends at most ``nfe`` evaluations with this sampler,
    e.g. Heun with nfe=35 gets 18 positive sigmas (2 * 18 - 1 = 35). ``snap`` moves the grid onto a
    discrete schedule's sigmas; ``kw`` goes to the discretization (``rho``, ``sigma_min``, ...)."""
    n = steps_for_nfe(sampler_name, nfe, **(options or {}))
    sigmas = discretizations.get_sigmas(discretization, n, schedule, **kw)
    if snap:
        if not getattr(schedule, "discrete", False):
            raise ValueError("snap=True needs a discrete schedule (e.g. ddpm, cosine)")
        sigmas = discretizations.snap_to_grid(sigmas, schedule.grid)
    return sigmas.to(device=device, dtype=dtype)


def sample(
    denoise: Denoise,
    schedule: Any,
    noise: Tensor,
    *,
    sampler: str = "heun",
    nfe: int = 35,
    discretization: str = "karras",
    options: dict[str, Any] | None = None,
    generator: Generator = None,
    callback: Callback | None = None,
    grid_options: dict[str, Any] | None = None,
) -> Tensor:
    """One call from standard-normal ``noise`` to samples: build the grid for the NFE budget,
    scale the noise to ``sigmas[0]``, run the sampler. ``grid_options`` go to the discretization."""
    smp = get_sampler(sampler, **(options or {}))
    sigmas = sigmas_for_nfe(
        schedule,
        sampler,
        nfe,
        discretization,
        options=options,
        dtype=noise.dtype,
        device=noise.device,
        **(grid_options or {}),
    )
    return smp(denoise, noise * sigmas[0], sigmas, generator=generator, callback=callback)
