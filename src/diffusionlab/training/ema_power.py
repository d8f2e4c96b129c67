"""EDM2's power-function EMA and its post-hoc reconstruction (Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", Sec. 3 and App. C).

A power-function EMA at time t averages the weights seen at times tau <= t with the profile
p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) (eq. 3); its width relative to t is
sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (eq. 4). Tracked step by step it is
the EMA with beta_t = (1 - 1/t)^(gamma + 1) (eq. 5, t in optimizer steps). Profiles of snapshots
taken during training span other profiles: the least-squares combination of snapshots whose
profile is closest (in L2 over tau) to a target profile solves A x = b with the profiles' inner
products in closed form (App. C.2, eqs. 18-20).
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


def profile_inner_products(
    t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray
) -> np.ndarray:
    """<p_a, p_b> = integral over tau of the two normalized profiles (EDM2 App. C.2), broadcast:
    (ga + 1)(gb + 1) min(ta, tb)^(ga + gb + 1) / ((ga + gb + 1) ta^(ga + 1) tb^(gb + 1))."""
    t_a, gamma_a, t_b, gamma_b = (
        np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b)
    )
    # written with the ratio of the shorter to the longer time, which stays in (0, 1]
    ratio = np.minimum(t_a, t_b) / np.maximum(t_a, t_b)
    exponent = np.where(t_a <= t_b, gamma_b, gamma_a)
    num = (gamma_a + 1) * (gamma_b + 1) * ratio**exponent
    return num / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def solve_coefficients(
    in_t: np.ndarray, in_gamma: np.ndarray, out_t: np.ndarray, out_gamma: np.ndarray
) -> np.ndarray:
    """Coefficients ``[n_in, n_out]``: output profile j is approximated by
    sum_i x[i, j] * input profile i, the least-squares solution of A x = B with
    A = <p_in, p_in> and B = <p_in, p_out> (EDM2 App. C.2, eq. 20)."""
    in_t, in_gamma = (np.asarray(v, dtype=np.float64).reshape(-1, 1) for v in (in_t, in_gamma))
    out_t, out_gamma = (np.asarray(v, dtype=np.float64).reshape(1, -1) for v in (out_t, out_gamma))
    gram = profile_inner_products(in_t, in_gamma, in_t.T, in_gamma.T)
    rhs = profile_inner_products(in_t, in_gamma, out_t, out_gamma)
    return np.linalg.lstsq(gram, rhs, rcond=None)[0]
