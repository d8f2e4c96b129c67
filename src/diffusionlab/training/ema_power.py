"""EDM2's power-function EMA and its post-hoc reconstruction (Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", Sec. 3 and App. C).

A power-function EMA at time t averages the weights seen at times tau <= t with the profile
p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) (eq. 3); its width relative to t is
sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (eq. 4). Tracked step by step it is
the EMA with beta_t = (1 - 1/t)^(gamma + 1) (eq. 5, t in optimizer steps). Profiles of snapshots
taken during training span other profiles: the least-squares combination of snapshots whose
profile is closest (in L2) to a target profile solves A x = b with the profiles' inner products
(App. C.2, eqs. 18-20). EDM2 integrates its continuous profiles; we sum the per-step weights the
discrete EMA really gave each step, which stays accurate in short runs.
"""

from __future__ import annotations

import math

import numpy as np

from diffusionlab.errors import ConfigError

# sigma_rel(gamma) rises to this at gamma = 0; the profiles used here have gamma > 0
SIGMA_REL_MAX = math.sqrt(1 / 12)


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power-function profile (EDM2 eq. 4)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float, key: str = "sigma_rel") -> float:
    """The exponent gamma > 0 with ``gamma_to_sigma_rel(gamma) == sigma_rel``: the largest real
    root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0 (eq. 4 squared and
    rearranged). ``key`` names the config value in the error."""
    if not 0.0 < sigma_rel < SIGMA_REL_MAX:
        raise ConfigError(
            f"{key}={sigma_rel!r} is out of range: a power-function EMA needs "
            f"0 < sigma_rel < {SIGMA_REL_MAX:.4f} (EDM2 uses 0.05 and 0.10)"
        )
    t = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def power_beta(gamma: float, step: int) -> float:
    """EMA decay after optimizer step ``step`` (1-based), beta = (1 - 1/step)^(gamma + 1)
    (EDM2 eq. 5): 0 at the first step, so the average starts at the first trained weights."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def _cumulative_log_beta(gamma: float, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """log beta_t and c_t = sum_{k=2..t} log beta_k for t = 1..horizon (index t - 1)."""
    t = np.arange(1, horizon + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        log_beta = (gamma + 1.0) * np.log1p(-1.0 / t)  # -inf at t = 1: beta_1 = 0
    return log_beta, np.concatenate([[0.0], np.cumsum(log_beta[1:])])


def _weight_rows(
    steps: list[int], gammas: list[float], tables: dict, lo: int, hi: int
) -> np.ndarray:
    """Per-step weights (see :func:`profile_weights`) of the steps lo+1..hi, one row per EMA."""
    out = np.zeros((len(steps), hi - lo))
    for row, (step, gamma) in enumerate(zip(steps, gammas, strict=True)):
        log_beta, c = tables[gamma]
        n = min(step, hi) - lo  # steps after ``step`` have weight 0
        if n > 0:
            out[row, :n] = -np.expm1(log_beta[lo : lo + n]) * np.exp(c[step - 1] - c[lo : lo + n])
    return out


def profile_weights(gamma: float, step: int, horizon: int) -> np.ndarray:
    """Weight of the trained weights of each step 1..``horizon`` in the power EMA after
    ``step`` updates with beta_t = (1 - 1/t)^(gamma + 1): w_j = (1 - beta_j) prod_{k=j+1..step}
    beta_k for j <= step, 0 after; they sum to 1 (beta_1 = 0). The discrete counterpart of
    EDM2's profile (gamma + 1) tau^gamma / t^(gamma + 1) (eq. 3)."""
    return _weight_rows([step], [gamma], {gamma: _cumulative_log_beta(gamma, horizon)}, 0, horizon)[
        0
    ]


def solve_coefficients(
    in_steps: list[int],
    in_gammas: list[float],
    out_steps: list[int],
    out_gammas: list[float],
    chunk: int = 1 << 16,
) -> np.ndarray:
    """Coefficients ``[n_in, n_out]``: output EMA j is approximated by sum_i x[i, j] * snapshot i,
    the least-squares fit of the output's per-step weights by the snapshots' (EDM2 App. C.2,
    eq. 20: A x = B with A and B the profiles' inner products). Two changes to EDM2's solve: the
    inner products sum the per-step weights the discrete EMA really gave (EDM2 integrates its
    continuous profiles), which stays accurate in short runs; and sum_i x[i, j] = 1 (a Lagrange
    multiplier), as for every average, so weights that did not move come back unchanged. The
    sums run over ``chunk`` steps at a time."""
    in_steps, out_steps = [int(s) for s in in_steps], [int(s) for s in out_steps]
    horizon = max(*in_steps, *out_steps)
    tables = {g: _cumulative_log_beta(g, horizon) for g in {*in_gammas, *out_gammas}}
    n = len(in_steps)
    kkt = np.zeros((n + 1, n + 1))
    rhs = np.zeros((n + 1, len(out_steps)))
    for lo in range(0, horizon, chunk):
        hi = min(lo + chunk, horizon)
        w_in = _weight_rows(in_steps, in_gammas, tables, lo, hi)
        kkt[:n, :n] += w_in @ w_in.T
        rhs[:n] += w_in @ _weight_rows(out_steps, out_gammas, tables, lo, hi).T
    kkt[:n, n] = kkt[n, :n] = 1.0
    rhs[n] = 1.0
    return np.linalg.lstsq(kkt, rhs, rcond=None)[0][:n]
