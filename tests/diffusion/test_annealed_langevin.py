"""NCSN's annealed Langevin dynamics on an analytic Gaussian and its NFE accounting."""

import pytest
import torch

from diffusionlab.diffusion import discretizations as dz
from diffusionlab.diffusion import samplers as S

MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
COV = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
EV, U = torch.linalg.eigh(COV)


def gauss(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x0 + sigma n] for x0 ~ N(MU, COV)."""
    s2 = sigma.view(-1, 1) ** 2
    return MU + (((x - MU) @ U) * EV / (EV + s2)) @ U.T


@pytest.mark.parametrize("final_denoise", [False, True])
def test_reaches_the_target_mean_and_covariance(final_denoise):
    """Without the final step the chain samples N(MU, COV + sigma_L^2 I); the final denoising
    step maps that through D, giving covariance COV (COV + sigma_L^2 I)^-1 COV."""
    n, sl = 3000, 0.1
    sig = dz.logsnr(10, sl, 10.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, dtype=torch.float64, generator=gen) * 10.0
    smp = S.get_sampler(
        "annealed_langevin", steps_per_level=60, eps=sl**2, final_denoise=final_denoise
    )
    out = smp(gauss, x, sig, generator=gen)
    assert (
        smp.nfe
        == 10 * 60 + final_denoise
        == S.nfe_for_steps("annealed_langevin", 10, steps_per_level=60, final_denoise=final_denoise)
    )
    noisy = COV + sl**2 * torch.eye(2, dtype=torch.float64)
    cov = COV @ torch.linalg.solve(noisy, COV) if final_denoise else noisy
    se_mean = (cov.diagonal() / n).sqrt()
    assert ((out.mean(0) - MU).abs() < 4 * se_mean).all(), out.mean(0)
    # sample covariance entries: standard error sqrt((c_ij^2 + c_ii c_jj) / n)
    se_cov = ((cov**2 + cov.diagonal()[:, None] * cov.diagonal()[None]) / n).sqrt()
    assert ((torch.cov(out.T) - cov).abs() < 4 * se_cov).all(), torch.cov(out.T)


def test_without_annealing_steps_the_chain_stays_put():
    """eps -> 0 makes every step the identity: the output is the input noise (score unused)."""
    sig = dz.logsnr(3, 0.1, 10.0)
    x = torch.randn(4, 2, dtype=torch.float64)
    smp = S.get_sampler("annealed_langevin", steps_per_level=2, eps=0.0, final_denoise=False)
    torch.testing.assert_close(smp(gauss, x, sig, generator=torch.Generator()), x)
    assert smp.nfe == 6


def test_nfe_budget_is_levels_times_steps_plus_final():
    assert S.steps_for_nfe("annealed_langevin", 1001) == 10
    assert S.steps_for_nfe("annealed_langevin", 101, steps_per_level=10) == 10
    assert S.steps_for_nfe("annealed_langevin", 100, steps_per_level=10) == 9
    assert S.nfe_for_steps("annealed_langevin", 10, steps_per_level=10, final_denoise=False) == 100
    with pytest.raises(ValueError, match="needs nfe >= 101"):
        S.steps_for_nfe("annealed_langevin", 50)
    with pytest.raises(ValueError, match="steps_per_level must be >= 1"):
        S.steps_for_nfe("annealed_langevin", 50, steps_per_level=0)
