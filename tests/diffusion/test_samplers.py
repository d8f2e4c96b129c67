"""Samplers against closed-form targets, papers' equivalences, NFE accounting and k-diffusion parity."""

import importlib.util
import inspect
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffusionlab.diffusion import discretizations as dz
from diffusionlab.diffusion import samplers as S
from diffusionlab.diffusion.analytic import Gaussian, GaussianMixture
from diffusionlab.diffusion.noise import StackedRandomGenerator
from diffusionlab.diffusion.schedules import get_schedule

# annealed Langevin spends levels x steps_per_level NFE and needs a step size fit to sigma_min:
# its tests are in test_annealed_langevin.py, not in these generic, any-grid ones
GRID_SAMPLERS = [n for n in S.SAMPLERS if n != "annealed_langevin"]
DET = [n for n in GRID_SAMPLERS if not S.get_sampler(n).stochastic]
STOCH = [n for n in GRID_SAMPLERS if S.get_sampler(n).stochastic]
SMIN, SMAX = 0.01, 20.0


@pytest.fixture(scope="module")
def gauss() -> Gaussian:
    cov = torch.tensor([[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 0.05]], dtype=torch.float64)
    return Gaussian(torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64), cov)


def ode_error(g: Gaussian, name: str, nfe: int, **options) -> float:
    """Mean distance to the exact PF-ODE endpoint at sigma_min, followed by the same final D."""
    x0 = torch.randn(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sig = dz.karras(S.steps_for_nfe(name, nfe), SMIN, SMAX)
    out = S.get_sampler(name, **options)(g, x0 * SMAX, sig)
    ref = g(g.ode_solution(x0 * SMAX, SMAX, SMIN), SMIN)
    return float((out - ref).norm(dim=1).mean())


def test_sampler_lists_cover_all():
    assert set(DET) | set(STOCH) | {"annealed_langevin"} == set(S.SAMPLERS)
    assert {"euler", "heun", "dpmpp_2m", "unipc", "rk45"} <= set(DET)
    assert {"ddpm", "euler_ancestral", "dpmpp_2m_sde", "pc", "euler_maruyama"} <= set(STOCH)


# ------------------------------------------------------------------ convergence order
@pytest.mark.parametrize(
    "name,options,order",
    [
        ("euler", {}, 1),
        ("ddim", {}, 1),
        ("heun", {}, 2),
        ("dpmpp_2m", {}, 2),
        ("dpmpp_2m", {"solver_type": "heun"}, 2),
        ("dpmpp_2s", {}, 2),
        ("plms", {}, 2),
        ("lms", {}, 2),
        ("dpmpp_3m", {}, 2),
        ("unipc", {"order": 2}, 3),
        ("unipc", {"order": 3}, 3),
        ("unipc", {"order": 2, "corrector": False}, 2),
    ],
)
def test_deterministic_order(gauss, name, options, order):
    """Error ratio when NFE doubles is ~2^order (warm-up steps cap 3M and LMS at order 2)."""
    e1, e2 = ode_error(gauss, name, 40, **options), ode_error(gauss, name, 80, **options)
    assert e2 < e1
    assert e1 / e2 > 0.8 * 2**order, (e1, e2)
    if name in ("euler", "heun", "dpmpp_2m"):  # exactly first / second order
        assert e1 / e2 < 1.25 * 2**order


def test_heun_error_small(gauss):
    assert ode_error(gauss, "heun", 79) < 1e-2
    assert ode_error(gauss, "unipc", 40) < 1e-3


def test_rk45_meets_tolerance(gauss):
    coarse = ode_error(gauss, "rk45", 1, rtol=1e-3, atol=1e-3)
    fine = ode_error(gauss, "rk45", 1, rtol=1e-7, atol=1e-7)
    assert fine < 1e-5 and fine < coarse / 10


# ------------------------------------------------------------------ stochastic samplers
# consistency sampling needs a consistency model, not a denoiser: its moments are tested on the
# exact consistency function in test_consistency.py
@pytest.mark.parametrize(
    "name,options",
    [(n, {}) for n in STOCH if n != "consistency"]
    + [("edm", {"S_churn": 30.0}), ("ddim", {"eta": 0.5}), ("ddpm", {"variance": "large"})],
)
def test_stochastic_matches_target_moments(name, options):
    g = Gaussian(torch.tensor([1.0, -0.5], dtype=torch.float64), torch.tensor([0.6, 0.1]))
    n = 3000
    gen = torch.Generator().manual_seed(1)
    sig = dz.karras(S.steps_for_nfe(name, 100, **options), 0.005, 10.0)
    x = torch.randn(n, 2, dtype=torch.float64, generator=gen) * sig[0]
    out = S.get_sampler(name, **options)(g, x, sig, generator=gen)
    var = g.evals[0]
    se = (var / n).sqrt()
    assert ((out.mean(0) - g.means[0]).abs() < 5 * se + 0.01).all(), out.mean(0)
    rel = out.var(0) / var
    assert ((rel - 1).abs() < 5 * math.sqrt(2 / n) + 0.05).all(), rel
    assert abs(float(torch.corrcoef(out.T)[0, 1])) < 0.06


# ------------------------------------------------------------------ equivalences
def test_ddim_eta0_is_euler_on_ddpm_schedule():
    sch = get_schedule("ddpm")
    sig = dz.get_sigmas("leading", 25, sch)
    g = Gaussian(torch.zeros(4, dtype=torch.float64), torch.tensor([1.0, 0.5, 0.2, 0.05]))
    x = torch.randn(8, 4, dtype=torch.float64) * sig[0]
    a = S.get_sampler("ddim", eta=0.0)(g, x, sig)
    b = S.get_sampler("euler")(g, x, sig)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_ddim_eta0_matches_ddim_paper_update_in_alpha_bar():
    """DDIM eq. 12 in the scaled VP variable x = sqrt(alpha_bar) x~ equals our sigma-space step."""
    sch = get_schedule("ddpm")
    sig = dz.get_sigmas("trailing", 10, sch)
    g = Gaussian(torch.zeros(2, dtype=torch.float64), torch.tensor([1.0, 0.1]))
    xt = torch.randn(5, 2, dtype=torch.float64) * sig[0]
    ours = S.get_sampler("ddim")(g, xt, sig)
    ab = 1 / (1 + sig**2)
    x = xt * ab[0].sqrt()
    for i in range(len(sig) - 1):
        x0 = g(x / ab[i].sqrt(), sig[i])
        eps = (x - ab[i].sqrt() * x0) / (1 - ab[i]).sqrt()
        x = ab[i + 1].sqrt() * x0 + (1 - ab[i + 1]).sqrt() * eps
    torch.testing.assert_close(ours, x, rtol=1e-10, atol=1e-10)


def test_ddim_eta1_is_ddpm_ancestral():
    g = Gaussian(torch.zeros(3, dtype=torch.float64), torch.tensor([1.0, 0.3, 0.1]))
    sig = dz.get_sigmas("linspace", 30, get_schedule("ddpm")).double()
    x = torch.randn(6, 3, dtype=torch.float64) * sig[0]
    a = S.get_sampler("ddim", eta=1.0)(g, x, sig, generator=torch.Generator().manual_seed(3))
    b = S.get_sampler("ddpm")(g, x, sig, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_dpmsolverpp_first_order_is_ddim(gauss):
    x = torch.randn(6, 3, dtype=torch.float64) * SMAX
    sig = dz.karras(20, SMIN, SMAX)
    ddim = S.get_sampler("ddim")(gauss, x, sig)
    uni1 = S.get_sampler("unipc", order=1, corrector=False)(gauss, x, sig)
    torch.testing.assert_close(uni1, ddim, rtol=1e-10, atol=1e-10)
    two = dz.karras(2, SMIN, SMAX)  # one finite step: every multistep solver is first order
    for name in ("dpmpp_2m", "dpmpp_3m", "unipc", "euler_ancestral"):
        opts = {"eta": 0.0} if name == "euler_ancestral" else {}
        out = S.get_sampler(name, **opts)(gauss, x, two)
        torch.testing.assert_close(
            out, S.get_sampler("ddim")(gauss, x, two), rtol=1e-10, atol=1e-10
        )


def test_heun_is_edm_without_churn(gauss):
    x = torch.randn(4, 3, dtype=torch.float64) * SMAX
    sig = dz.karras(10, SMIN, SMAX)
    torch.testing.assert_close(
        S.get_sampler("heun")(gauss, x, sig), S.get_sampler("edm")(gauss, x, sig)
    )


# ------------------------------------------------------------------ NFE, callback, API
@pytest.mark.parametrize("name", [n for n in GRID_SAMPLERS if n != "rk45"])
@pytest.mark.parametrize("nfe", [1, 2, 7, 12])
def test_nfe_is_exact_and_within_budget(gauss, name, nfe):
    if name == "pc" and nfe < 2:
        with pytest.raises(ValueError, match="nfe >= 2"):
            S.steps_for_nfe(name, nfe)
        return
    n = S.steps_for_nfe(name, nfe)
    sig = dz.karras(n, SMIN, SMAX)
    seen = []
    smp = S.get_sampler(name)
    smp(gauss, torch.randn(2, 3, dtype=torch.float64) * SMAX, sig, callback=seen.append)
    assert smp.nfe == S.nfe_for_steps(name, n) <= nfe
    if name in ("euler", "dpmpp_2m", "unipc", "ddpm"):
        assert smp.nfe == nfe
    if name in ("heun", "dpmpp_2s"):
        assert smp.nfe == nfe - (1 - nfe % 2)
    assert [info["i"] for info in seen] == list(range(n))
    assert seen[-1]["nfe"] <= smp.nfe and set(seen[0]) == {"i", "sigma", "x", "denoised", "nfe"}


def test_heun_35_nfe_is_18_steps():
    assert S.steps_for_nfe("heun", 35) == 18
    assert len(S.sigmas_for_nfe(get_schedule("edm"), "heun", 35)) == 19


def test_bad_inputs_raise_clear_errors(gauss):
    with pytest.raises(ValueError, match="valid: euler, heun"):
        S.get_sampler("nope")
    with pytest.raises(ValueError, match="valid: eta, s_noise"):
        S.get_sampler("euler_ancestral", churn=1.0)
    with pytest.raises(ValueError, match="nfe must be >= 1"):
        S.sigmas_for_nfe(get_schedule("edm"), "heun", 0)
    x = torch.zeros(2, 3, dtype=torch.float64)
    for bad in ([1.0, 2.0, 0.0], [2.0, 1.0], [2.0, 2.0, 0.0], [[2.0, 0.0]], [2.0, -1.0, 0.0]):
        with pytest.raises(ValueError, match="strictly decreasing"):
            S.get_sampler("euler")(gauss, x, torch.tensor(bad))
    with pytest.raises(ValueError, match="order must be"):
        S.get_sampler("unipc", order=5)(gauss, x, dz.karras(3, SMIN, SMAX))


@pytest.mark.parametrize("name", ["heun", "dpmpp_3m", "unipc", "lms", "rk45"])
def test_float32_close_to_float64(gauss, name):
    g32 = Gaussian(gauss.means[0].float(), gauss.covs[0].float())
    sig = dz.karras(S.steps_for_nfe(name, 20), SMIN, SMAX)
    x = torch.randn(16, 3, dtype=torch.float64) * SMAX
    a = S.get_sampler(name)(gauss, x, sig, generator=torch.Generator().manual_seed(0))
    b = S.get_sampler(name)(g32, x.float(), sig.float(), generator=torch.Generator().manual_seed(0))
    assert b.dtype == torch.float32
    torch.testing.assert_close(b.double(), a, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("name", STOCH)
def test_stochastic_float32_stays_float32(gauss, name):
    g32 = Gaussian(gauss.means[0].float(), gauss.covs[0].float())
    sig = dz.karras(S.steps_for_nfe(name, 10), SMIN, SMAX).float()
    gen = StackedRandomGenerator(range(4))
    out = S.get_sampler(name)(g32, gen.randn((4, 3)) * SMAX, sig, generator=gen)
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", [n for n in STOCH if n != "pc"])  # PC's step uses batch norms
def test_per_sample_generator_makes_samples_batch_independent(gauss, name):
    sig = dz.karras(S.steps_for_nfe(name, 8), SMIN, SMAX)
    noise = StackedRandomGenerator(range(6)).randn((6, 3), dtype=torch.float64)
    full = S.get_sampler(name)(gauss, noise * SMAX, sig, generator=StackedRandomGenerator(range(6)))
    part = S.get_sampler(name)(
        gauss, noise[3:] * SMAX, sig, generator=StackedRandomGenerator(range(3, 6))
    )
    torch.testing.assert_close(part, full[3:], rtol=1e-12, atol=1e-12)


def test_sample_convenience_scales_noise_and_uses_budget(gauss):
    sch = get_schedule("edm")
    noise = torch.randn(4, 3, dtype=torch.float64)
    infos = []
    out = S.sample(gauss, sch, noise, sampler="heun", nfe=11, callback=infos.append)
    sig = S.sigmas_for_nfe(sch, "heun", 11)
    torch.testing.assert_close(out, S.get_sampler("heun")(gauss, noise * sch.sigma_max, sig))
    assert infos[-1]["nfe"] == 11 and torch.equal(infos[0]["x"], noise * sch.sigma_max)
    out2 = S.sample(gauss, sch, noise, sampler="dpmpp_2m", nfe=6, grid_options={"rho": 3.0})
    sig2 = dz.karras(6, sch.sigma_min, sch.sigma_max, rho=3.0)
    torch.testing.assert_close(out2, S.get_sampler("dpmpp_2m")(gauss, noise * sig2[0], sig2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", ["heun", "dpmpp_3m_sde", "unipc", "rk45"])
def test_runs_on_gpu(gauss, name):
    g = Gaussian(gauss.means[0].cuda(), gauss.covs[0].cuda())
    sig = dz.karras(S.steps_for_nfe(name, 10), SMIN, SMAX).cuda()
    x = torch.randn(8, 3, dtype=torch.float64, device="cuda") * SMAX
    out = S.get_sampler(name)(g, x, sig, generator=torch.Generator("cuda").manual_seed(0))
    cpu = S.get_sampler(name)(gauss, x.cpu(), sig.cpu(), generator=None)
    assert out.device.type == "cuda"
    if not S.get_sampler(name).stochastic:
        torch.testing.assert_close(out.cpu(), cpu, rtol=1e-8, atol=1e-8)


# ------------------------------------------------------------------ k-diffusion parity
def _k_sampling():
    """k_diffusion.sampling, even when the package's other modules miss optional deps."""
    try:
        import k_diffusion.sampling as ks

        return ks
    except ImportError:
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None:
            pytest.skip("k_diffusion not installed")
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = pkg
        try:
            import k_diffusion.sampling as ks
        except ImportError as err:
            pytest.skip(f"k_diffusion.sampling not importable: {err}")
        return ks


PARITY = [
    ("euler", {}, "sample_euler", {}),
    ("heun", {}, "sample_heun", {}),
    ("lms", {}, "sample_lms", {}),
    ("dpmpp_2m", {}, "sample_dpmpp_2m", {}),
    ("dpmpp_2s", {}, "sample_dpmpp_2s_ancestral", {"eta": 0.0}),
    ("euler_ancestral", {}, "sample_euler_ancestral", {}),
    ("dpmpp_2s_ancestral", {}, "sample_dpmpp_2s_ancestral", {}),
    ("dpmpp_2m_sde", {}, "sample_dpmpp_2m_sde", {}),
    (
        "dpmpp_2m_sde",
        {"solver_type": "heun", "eta": 0.7},
        "sample_dpmpp_2m_sde",
        {"solver_type": "heun", "eta": 0.7},
    ),
    ("dpmpp_3m_sde", {}, "sample_dpmpp_3m_sde", {}),
    ("dpmpp_3m", {}, "sample_dpmpp_3m_sde", {"eta": 0.0}),
]


@pytest.mark.parity
@pytest.mark.parametrize("name,ours,kname,theirs", PARITY)
def test_parity_with_k_diffusion(gauss, name, ours, kname, theirs):
    ks = _k_sampling()
    sig = dz.karras(12, 0.002, 80.0)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80.0
    a = S.get_sampler(name, **ours)(gauss, x, sig, generator=torch.Generator().manual_seed(7))
    kgen = torch.Generator().manual_seed(7)
    fn = getattr(ks, kname)
    extra = {"noise_sampler": lambda s, sn: torch.randn(x.shape, generator=kgen, dtype=x.dtype)}
    if "noise_sampler" not in inspect.signature(fn).parameters:
        extra = {}
    b = fn(gauss, x, sig, disable=True, **theirs, **extra)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parity
def test_parity_edm_churn_with_k_diffusion(gauss):
    ks = _k_sampling()
    sig = dz.karras(10, 0.002, 80.0)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80.0
    torch.manual_seed(11)
    a = S.get_sampler("edm", S_churn=5.0, S_noise=1.003)(gauss, x, sig)
    torch.manual_seed(11)
    b = ks.sample_heun(gauss, x, sig, disable=True, s_churn=5.0, s_noise=1.003)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parity
def test_parity_karras_grid_with_k_diffusion():
    ks = _k_sampling()
    ours = dz.karras(17, 0.002, 80.0, rho=7.0)
    theirs = ks.get_sigmas_karras(17, 0.002, 80.0, 7.0)  # float32 in k-diffusion
    torch.testing.assert_close(ours.float(), theirs, rtol=2e-6, atol=1e-7)


# ------------------------------------------------------------------ configs
CONF = Path(__file__).resolve().parents[2] / "conf"


SAMPLER_YAMLS = sorted(p for p in (CONF / "sampler").glob("*.yaml") if p.stem != "inherit")


@pytest.mark.parametrize("path", SAMPLER_YAMLS, ids=lambda p: p.stem)
def test_sampler_configs_build_and_run(gauss, path):
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    assert set(cfg) == {"name", "nfe", "discretization", "sigmas_file", "noise", "options"}
    assert cfg["name"] == path.stem and cfg["sigmas_file"] is None and cfg["noise"] == "per_seed"
    smp = S.get_sampler(cfg["name"], **cfg["options"])
    nfe = 6 if cfg["name"] in GRID_SAMPLERS else S.nfe_for_steps(cfg["name"], 2, **cfg["options"])
    sig = S.sigmas_for_nfe(
        get_schedule("edm"), cfg["name"], nfe, cfg["discretization"], options=cfg["options"]
    )
    out = smp(
        gauss, torch.randn(4, 3, dtype=torch.float64) * sig[0], sig, generator=torch.Generator()
    )
    assert bool(torch.isfinite(out).all())


def test_hydra_override_selects_sampler_and_nfe():
    hydra = pytest.importorskip("hydra")
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra.compose("train", overrides=["sampler=dpmpp_2m", "sampler.nfe=20"])
    assert OmegaConf.to_container(cfg.sampler) == {
        "name": "dpmpp_2m",
        "nfe": 20,
        "discretization": "karras",
        "sigmas_file": None,
        "noise": "per_seed",
        "options": {"eta": 0.0, "s_noise": 1.0, "solver_type": "midpoint"},
    }


@pytest.mark.parity
@pytest.mark.parametrize("order", [1, 2, 3])
def test_parity_unipc_with_diffusers(gauss, order):
    """diffusers' UniPCMultistepScheduler (bh2, x0 prediction, DDPM betas) in the scaled VP
    variable x = x~ / sqrt(1 + sigma^2) matches our sigma-space UniPC on its own sigmas."""
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        prediction_type="sample",
        solver_order=order,
        solver_type="bh2",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    sch.set_timesteps(12)
    sig = sch.sigmas.double()
    xt = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sig[0]
    x = xt / (1 + sig[0] ** 2).sqrt()
    for i, t in enumerate(sch.timesteps):
        x = sch.step(gauss(x * (1 + sig[i] ** 2).sqrt(), sig[i]), t, x).prev_sample
    ours = S.get_sampler("unipc", order=order)(gauss, xt, sig)
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)  # diffusers keeps float32 alphas


@pytest.mark.parity
@pytest.mark.parametrize(
    "name,eta", [("ddpm", None), ("ddpm_large", None), ("ddim", 1.0), ("ddim", 0.0)]
)
def test_parity_ddpm_ddim_with_diffusers(gauss, name, eta):
    """diffusers' DDPMScheduler (posterior variance) and DDIMScheduler(eta) on 10 'leading'
    steps, run in the scaled VP variable with the same noise stream, match ours in sigma-space."""
    diffusers = pytest.importorskip("diffusers")
    common = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "sample"}
    if name.startswith("ddpm"):
        var = "fixed_large" if name == "ddpm_large" else "fixed_small"
        sch = diffusers.DDPMScheduler(variance_type=var, clip_sample=False, **common)
    else:
        sch = diffusers.DDIMScheduler(set_alpha_to_one=True, clip_sample=False, **common)
    sch.set_timesteps(10)
    ab, ts = sch.alphas_cumprod.double(), sch.timesteps
    sig = torch.cat([((1 - ab[ts]) / ab[ts]).sqrt(), torch.zeros(1, dtype=torch.float64)])
    xt = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sig[0]
    x, gen = xt * ab[ts[0]].sqrt(), torch.Generator().manual_seed(5)
    kw = {} if eta is None else {"eta": eta}
    for i, t in enumerate(ts):
        x = sch.step(gauss(x / ab[t].sqrt(), sig[i]), t, x, generator=gen, **kw).prev_sample
    if name == "ddpm_large":
        name, kw = "ddpm", {"variance": "large"}
    ours = S.get_sampler(name, **kw)(gauss, xt, sig, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, x, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", [*STOCH, "heun", "unipc", "dpmpp_3m"])
def test_gmm_mode_weights_at_high_nfe(name):
    """On an uneven 4-mode mixture every sampler puts each mode's mass within sampling error."""
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, -2.0]], dtype=torch.float64)
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    gmm = GaussianMixture(weights, means, torch.full((4, 2), 0.05, dtype=torch.float64))
    n, gen = 6000, torch.Generator().manual_seed(0)
    sig = dz.karras(S.steps_for_nfe(name, 300), 0.002, 40.0)
    out = S.get_sampler(name)(
        gmm, torch.randn(n, 2, dtype=torch.float64, generator=gen) * 40.0, sig, generator=gen
    )
    mode = (out[:, None] - means).norm(dim=-1).argmin(1)
    frac = torch.bincount(mode, minlength=4).double() / n
    assert ((frac - weights).abs() < 5 * (weights * (1 - weights) / n).sqrt() + 0.01).all(), frac
    within = (out - means[mode]).pow(2).mean(0) / 0.05
    assert ((within - 1).abs() < 0.15).all(), within


def test_ddpm_clip_denoised_clamps_d_to_the_data_range():
    """DDPM's clip_denoised: D = 5 is taken as 1; the step's mean is D + (sn/s)^2 (x - D)."""
    x = torch.zeros(2, 3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    far = S._Model(lambda x, sigma: torch.full_like(x, 5.0), None)
    for clip, want in ((True, 1.0), (False, 5.0)):
        out = S.ddpm(far, x, [2.0, 1.0, 0.0], gen, variance="small", clip_denoised=clip)
        torch.testing.assert_close(out, torch.full_like(x, want))


# ------------------------------------------------------------------ registry
def test_a_sampler_is_one_decorated_function(gauss, monkeypatch):
    """A new sampler registers its loop, cost model and noise predicate in one record; every
    helper (options check, NFE <-> steps, stochastic, grids) then knows it."""
    monkeypatch.setattr(S, "SAMPLERS", dict(S.SAMPLERS))

    @S.register_sampler(S.TWO_PER_STEP, S.draws_noise("eta", 0.0))
    def midpoint(m, x, sig, gen, eta: float = 0.0):
        for i in range(len(sig) - 1):
            s, sn = sig[i], sig[i + 1]
            if sn == 0:
                x = m(x, s)
                continue
            mid = (s * sn) ** 0.5
            x_mid = x + (mid - s) / s * (x - m(x, s))
            x = x + (sn - s) / mid * (x_mid - m(x_mid, mid))
        return x

    assert S.steps_for_nfe("midpoint", 39) == 20 and S.nfe_for_steps("midpoint", 20) == 39
    assert not S.get_sampler("midpoint").stochastic and S.get_sampler("midpoint", eta=1).stochastic
    z = torch.randn(256, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = {}
    for name in ("midpoint", "euler"):
        smp = S.get_sampler(name)
        sig = S.sigmas_for_nfe(get_schedule("edm"), name, 39)
        out = smp(gauss, z * sig[0], sig)
        assert smp.nfe == 39
        exact = gauss.ode_solution(z * sig[0], float(sig[0]), 0.0)
        errors[name] = float((out - exact).norm(dim=1).mean())
    assert errors["midpoint"] < 0.5 * errors["euler"]  # second order at the same NFE
    with pytest.raises(ValueError, match="unknown options"):
        S.get_sampler("midpoint", churn=1)
    with pytest.raises(ValueError, match="registered twice"):
        S.register_sampler()(midpoint)
