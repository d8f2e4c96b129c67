"""Noise distributions, weightings and DiffusionLoss: equivalences, Bayes optimum, finiteness."""

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from diffusionlab.diffusion.analytic import Gaussian
from diffusionlab.diffusion.losses import DiffusionLoss
from diffusionlab.diffusion.noise import StackedRandomGenerator, randn_like
from diffusionlab.diffusion.noise_distributions import (
    LogitNormal,
    LogNormal,
    NoiseDistribution,
    UniformLogSNR,
    UniformT,
    get_noise_distribution,
)
from diffusionlab.diffusion.parameterizations import (
    PARAMETERIZATIONS,
    Denoiser,
    EDMParam,
    Parameterization,
    get_parameterization,
)
from diffusionlab.diffusion.schedules import Schedule, get_schedule
from diffusionlab.diffusion.weightings import (
    WEIGHTINGS,
    EDMWeighting,
    MinSNRWeighting,
    SimpleWeighting,
    SNRWeighting,
    SoftMinSNRWeighting,
    UncertaintyWeighting,
    get_weighting,
)

SCHEDULES = ["ddpm", "vp", "cosine", "cosine_continuous", "ve", "edm", "flow", "flow_shift3"]


def schedule(name):
    return get_schedule("flow", shift=3.0) if name == "flow_shift3" else get_schedule(name)


class Linear(nn.Module):
    """F = a x + b c_noise: a tiny network for every data shape (a flow map's second time,
    ``cond_vector``, unread)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.7, dtype=dtype))
        self.b = nn.Parameter(torch.tensor(0.01, dtype=dtype))

    def forward(self, x, c_noise, class_labels=None, augment_labels=None, cond_vector=None):
        return self.a * x + self.b * c_noise.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class Fixed(NoiseDistribution):
    """Every sample at one sigma."""

    def __init__(self, sigma):
        self.value = sigma

    def sample(self, n, schedule, generator=None, device=None):
        return torch.full((n,), self.value, device=device)


def replay(loss_fn, x0, seed):
    """The sigma and noise DiffusionLoss draws with ``torch.Generator().manual_seed(seed)``."""
    g = torch.Generator().manual_seed(seed)
    sigma = loss_fn.noise.sample(x0.shape[0], loss_fn.schedule, g)
    return sigma, randn_like(x0, g)


# ---------------------------------------------------------------- equivalences
def test_simple_eps_loss_is_d_space_with_inverse_sigma_squared():
    g = torch.Generator().manual_seed(0)
    x0, eps, eps_pred = (
        torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3)
    )
    sigma = torch.logspace(-2, 1.5, 8, dtype=torch.float64).view(8, 1, 1, 1)
    d = (x0 + sigma * eps) - sigma * eps_pred  # D of the eps parameterization
    eps_loss = (eps_pred - eps).square().flatten(1).mean(1)
    d_loss = (d - x0).square().flatten(1).mean(1) / sigma.flatten() ** 2
    torch.testing.assert_close(eps_loss, d_loss)


def test_diffusion_loss_eps_equals_ddpm_simple_loss():
    """DDPM's L_simple = ||eps - eps_theta(sqrt(abar) x0 + sqrt(1 - abar) eps, t)||^2, t uniform."""
    sched = get_schedule("ddpm")
    net = Linear()
    loss_fn = DiffusionLoss(sched, get_parameterization("eps", sched), weighting="simple")
    x0 = torch.randn(16, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    loss, sigma = loss_fn(
        Denoiser(net, loss_fn.parameterization), x0, generator=torch.Generator().manual_seed(5)
    )
    sigma_r, eps = replay(loss_fn, x0, 5)
    torch.testing.assert_close(sigma, sigma_r)
    t = sched.sigma_to_index(sigma)
    abar = sched.scale(t.double()).float().view(-1, 1, 1, 1) ** 2
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    eps_pred = net(x_t, t.float())
    torch.testing.assert_close(
        loss, (eps_pred - eps).square().flatten(1).mean(1), rtol=1e-4, atol=1e-5
    )


def test_flow_matching_loss_is_d_space_with_flow_weight():
    """||v_pred - (n - x0)||^2 = ((1 + sigma) / sigma)^2 ||D - x0||^2 with x_t = (1 - t) x0 + t n."""
    sched = get_schedule("flow")
    net = Linear()
    param = get_parameterization("flow", sched)
    loss_fn = DiffusionLoss(sched, param, noise=LogitNormal(), weighting=SimpleWeighting())
    x0 = torch.randn(16, 5, generator=torch.Generator().manual_seed(2))
    loss, sigma = loss_fn(Denoiser(net, param), x0, generator=torch.Generator().manual_seed(7))
    _, n = replay(loss_fn, x0, 7)
    t = (sigma / (1 + sigma)).view(-1, 1)
    v_pred = net((1 - t) * x0 + t * n, 1000 * t.flatten())
    fm = (v_pred - (n - x0)).square().mean(1)
    torch.testing.assert_close(loss, fm, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(param.loss_weight(sigma), ((1 + sigma) / sigma) ** 2)


@pytest.mark.parametrize("name", list(PARAMETERIZATIONS))
def test_simple_weighting_is_mse_on_the_networks_own_target(name):
    sched = get_schedule("vp")
    param = get_parameterization(name, sched)
    net = Linear()
    loss_fn = DiffusionLoss(sched, param, noise="uniform_t", weighting="simple")
    x0 = torch.randn(32, 6, generator=torch.Generator().manual_seed(3))
    loss, sigma = loss_fn(Denoiser(net, param), x0, generator=torch.Generator().manual_seed(9))
    _, n = replay(loss_fn, x0, 9)
    c_skip, c_out, c_in, c_noise = (c.view(-1, 1) for c in param.coefficients(sigma))
    x = x0 + sigma.view(-1, 1) * n
    target = (x0 - c_skip * x) / c_out
    torch.testing.assert_close(
        loss, (net(c_in * x, c_noise.flatten()) - target).square().mean(1), rtol=2e-4, atol=1e-5
    )


def test_weighting_formulas():
    sigma = torch.logspace(-3, 2, 50, dtype=torch.float64)
    snr = sigma**-2
    edm = get_parameterization("edm", get_schedule("edm"), sigma_data=0.5)
    eps = get_parameterization("eps", get_schedule("edm"))
    v = get_parameterization("v", get_schedule("edm"))
    torch.testing.assert_close(SNRWeighting().lam(sigma, edm), snr)
    # Hang et al.: eps-loss weight min(SNR, g) / SNR, v-loss weight min(SNR, g) / (SNR + 1)
    ms = MinSNRWeighting(5.0).lam(sigma, edm)
    torch.testing.assert_close(ms, torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)))
    torch.testing.assert_close(
        ms, torch.minimum(snr, torch.tensor(5.0).double()) / snr * eps.loss_weight(sigma)
    )
    torch.testing.assert_close(
        ms, torch.minimum(snr, torch.tensor(5.0).double()) / (snr + 1) * v.loss_weight(sigma)
    )
    soft = SoftMinSNRWeighting(5.0).lam(sigma, edm)
    assert (soft <= torch.minimum(snr, torch.tensor(5.0).double())).all()
    torch.testing.assert_close(
        soft[[0, -1]] / torch.tensor([5.0, snr[-1]]).double(),
        torch.ones(2).double(),
        rtol=1e-3,
        atol=0,
    )
    # k-diffusion's soft-min-snr with sigma_data = 0.5: F-space (sigma sd)^2 / (sigma^2 + sd^2)^2
    k = (sigma * 0.5) ** 2 / (sigma**2 + 0.25) ** 2 * edm.loss_weight(sigma)
    torch.testing.assert_close(SoftMinSNRWeighting(4.0).lam(sigma, edm), k)
    torch.testing.assert_close(
        EDMWeighting().lam(sigma, edm), (sigma**2 + 0.25) / (0.5 * sigma) ** 2
    )
    edm7 = get_parameterization("edm", get_schedule("edm"), sigma_data=0.7)
    torch.testing.assert_close(EDMWeighting().lam(sigma, edm7), edm7.loss_weight(sigma))


# ---------------------------------------------------------------- Bayes optimum on Gaussian data
class GaussianNet(nn.Module):
    """F such that D is the exact denoiser of ``analytic.Gaussian`` (mu + var / (var + sigma^2)
    (x~ - mu)), optionally perturbed (shift of mu, scale of the shrinkage)."""

    def __init__(self, param, mu, var, mu_shift=0.0, gain=1.0):
        super().__init__()
        self.param, self.mu, self.gain = param, mu + mu_shift, gain
        self.gaussian = Gaussian(mu + mu_shift, var)

    def forward(self, x, c_noise, class_labels=None, augment_labels=None):
        sigma = (4 * c_noise).exp()  # c_noise = ln(sigma) / 4
        c_skip, c_out, c_in, _ = (c.view(-1, 1) for c in self.param.coefficients(sigma))
        xt = x / c_in
        d = self.mu + self.gain * (self.gaussian.denoise(xt, sigma) - self.mu)
        return (d - c_skip * xt) / c_out


@pytest.mark.parametrize("weighting", [EDMWeighting(), SNRWeighting(), MinSNRWeighting()])
def test_gaussian_denoiser_reaches_bayes_optimal_loss(weighting):
    torch.manual_seed(0)
    dim, batch = 16, 20000
    mu, var = torch.linspace(-1, 1, dim), torch.linspace(0.05, 2.0, dim)
    sched = get_schedule("edm")
    param = EDMParam(sched)
    loss_fn = DiffusionLoss(sched, param, noise=LogNormal(), weighting=weighting)
    x0 = mu + var.sqrt() * torch.randn(batch, dim, generator=torch.Generator().manual_seed(4))

    def run(**perturb):
        den = Denoiser(GaussianNet(param, mu, var, **perturb), param)
        return loss_fn(den, x0, generator=torch.Generator().manual_seed(11))

    loss, sigma = run()
    s2 = sigma.view(-1, 1) ** 2
    mmse = (var * s2 / (var + s2)).mean(1)  # per-dim MMSE of a Gaussian, averaged over dims
    bayes = weighting.lam(sigma, param) * mmse
    ratio = loss.sum() / bayes.sum()
    assert abs(ratio.item() - 1) < 0.02, ratio
    for perturb in ({"mu_shift": 0.05}, {"gain": 1.05}, {"gain": 0.95}):
        worse, _ = run(**perturb)
        assert worse.mean() > loss.mean() * 1.001, perturb


# ---------------------------------------------------------------- noise distributions
def test_uniform_t_discrete_and_continuous():
    ddpm, vp = get_schedule("ddpm"), get_schedule("vp")
    g = torch.Generator().manual_seed(0)
    sigma = UniformT().sample(20000, ddpm, g)
    idx = ddpm.sigma_to_index(sigma)
    torch.testing.assert_close(sigma, ddpm.grid[idx])
    counts = torch.bincount(idx, minlength=1000)
    assert counts.min() > 0 and idx.max() == 999
    assert abs(idx.float().mean().item() - 499.5) < 10
    t = vp.t_of_sigma(UniformT().sample(20000, vp, g).double())
    assert t.min() >= vp.t_min and t.max() <= 1.0 + 1e-6
    assert abs(t.mean().item() - 0.5) < 0.01
    frac = ddpm.t_of_sigma(UniformT(discrete=False).sample(1000, ddpm, g).double())
    assert (frac != frac.round()).any()
    with pytest.raises(ValueError, match="discrete=True"):
        UniformT(discrete=True).sample(4, vp, g)


def test_log_normal_and_logit_normal_moments():
    g = torch.Generator().manual_seed(1)
    log_sigma = LogNormal().sample(50000, get_schedule("edm"), g).log()
    assert abs(log_sigma.mean().item() + 1.2) < 0.02 and abs(log_sigma.std().item() - 1.2) < 0.02
    flow = get_schedule("flow")
    t = flow.t_of_sigma(LogitNormal(loc=0.5, scale=0.8).sample(50000, flow, g).double())
    u = (t - flow.t_min) / (flow.t_max - flow.t_min)
    logit = torch.log(u / (1 - u))
    assert abs(logit.mean().item() - 0.5) < 0.02 and abs(logit.std().item() - 0.8) < 0.02


def test_uniform_log_snr_and_its_importance_weights():
    vp = get_schedule("vp")
    g = torch.Generator().manual_seed(2)
    noise = UniformLogSNR(reweight=True)
    sigma = noise.sample(200000, vp, g).double()
    lo, hi = math.log(vp.sigma_min), math.log(vp.sigma_max)
    assert sigma.log().min() >= lo - 1e-5 and sigma.log().max() <= hi + 1e-5
    assert abs(sigma.log().mean().item() - (lo + hi) / 2) < 0.05
    torch.testing.assert_close(UniformLogSNR().importance_weight(sigma, vp), torch.ones_like(sigma))
    # E_logsnr[w f(sigma)] = E_{t ~ U}[f(sigma(t))]
    w = noise.importance_weight(sigma, vp)

    def f(s):
        return s / (1 + s)

    target = f(vp.sigma(torch.rand(200000, generator=g, dtype=torch.float64))).mean()
    assert abs((w * f(sigma)).mean() / target - 1) < 0.02
    assert abs(w.mean().item() - 1) < 0.02


@pytest.mark.parametrize(
    "make_gen", [lambda: torch.Generator().manual_seed(3), lambda: StackedRandomGenerator(range(6))]
)
def test_generator_makes_the_loss_deterministic(make_gen):
    sched = get_schedule("edm")
    param = EDMParam(sched)
    loss_fn = DiffusionLoss(sched, param)
    den = Denoiser(Linear(), param)
    x0 = torch.randn(6, 2, 2)
    a = loss_fn(den, x0, generator=make_gen())
    b = loss_fn(den, x0, generator=make_gen())
    torch.testing.assert_close(a, b)
    assert isinstance(loss_fn.noise, LogNormal) and isinstance(loss_fn.weighting, SimpleWeighting)
    assert isinstance(DiffusionLoss(sched, get_parameterization("eps", sched)).noise, UniformT)


# ---------------------------------------------------------------- EDM2 uncertainty
def test_uncertainty_weighting_starts_at_base_and_learns_log_of_weighted_mse():
    param = EDMParam(get_schedule("edm"))
    w = UncertaintyWeighting()
    sigma = torch.tensor([0.1, 1.0, 10.0])
    mse = torch.tensor([0.3, 0.2, 0.05])
    torch.testing.assert_close(w(mse, sigma, param), EDMWeighting().lam(sigma, param) * mse)
    # the optimum of a / e^u + u is u = ln a
    target = (EDMWeighting().lam(sigma, param) * mse).log()
    opt = torch.optim.Adam(w.parameters(), lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        w(mse, sigma, param).sum().backward()
        opt.step()
    torch.testing.assert_close(w.logvar(sigma), target, atol=0.05, rtol=0)
    loss_fn = DiffusionLoss(get_schedule("edm"), param, weighting=UncertaintyWeighting())
    assert any(p.requires_grad for p in loss_fn.parameters())


# ---------------------------------------------------------------- every combination is finite
@pytest.mark.parametrize("sched_name", SCHEDULES)
def test_every_combination_is_finite_at_both_ends(sched_name):
    sched = schedule(sched_name)
    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    for pname in PARAMETERIZATIONS:
        param = get_parameterization(pname, sched)
        for wname in WEIGHTINGS:
            for sigma in (sched.sigma_min, sched.sigma_max):
                for dtype in (torch.float32, torch.bfloat16):
                    loss_fn = DiffusionLoss(
                        sched, param, noise=Fixed(sigma), weighting=get_weighting(wname)
                    )
                    den = Denoiser(Linear(dtype), param)
                    loss, s = loss_fn(den, x0.to(dtype), generator=torch.Generator().manual_seed(1))
                    assert loss.dtype == torch.float32 and loss.shape == (3,)
                    assert torch.isfinite(loss).all(), (pname, wname, sigma, dtype)
                    loss.sum().backward()
                    assert all(torch.isfinite(p.grad).all() for p in den.parameters())
    for noise in (UniformT(), LogNormal(), LogitNormal(), UniformLogSNR(reweight=True)):
        loss_fn = DiffusionLoss(sched, get_parameterization("eps", sched), noise=noise)
        loss, _ = loss_fn(Denoiser(Linear(), loss_fn.parameterization), x0)
        assert torch.isfinite(loss).all(), noise


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: LogNormal(p_std=0.0), "p_std=0.0"),
        (lambda: LogNormal(p_std=-1.2), "p_std=-1.2"),
        (lambda: LogitNormal(scale=0.0), "scale=0.0"),
        (lambda: MinSNRWeighting(gamma=-5.0), "gamma=-5.0"),
        (lambda: SoftMinSNRWeighting(gamma=0.0), "gamma=0.0"),
        (lambda: EDMWeighting(sigma_data=-0.5), "sigma_data=-0.5"),
        (lambda: UncertaintyWeighting(channels=0), "channels=0"),
        (lambda: get_noise_distribution("gauss"), "noise='gauss'"),
        (lambda: get_weighting("p2"), "weighting='p2'"),
        (
            lambda: DiffusionLoss(
                get_schedule("vp"),
                get_parameterization("eps", get_schedule("vp")),
                weighting="huber",
            ),
            "weighting='huber'",
        ),
    ],
)
def test_bad_values_raise_value_error(build, key):
    with pytest.raises(ValueError, match=key) as info:
        build()
    if "'" in key:
        assert "valid names" in str(info.value)


# ---------------------------------------------------------------- Hydra config groups
CONF = Path(__file__).resolve().parents[2] / "conf"


def group(name):
    return sorted((CONF / name).glob("*.yaml"))


def test_config_groups_exist():
    names = {g: {p.stem for p in group(g)} for g in ("schedule", "parameterization", "loss")}
    assert {"ddpm", "vp", "cosine", "ve", "edm", "flow", "flow_shifted"} <= names["schedule"]
    assert {"eps", "x0", "v", "edm", "flow"} <= names["parameterization"]
    assert {"simple", "snr", "min_snr", "soft_min_snr", "edm", "edm2", "flow"} <= names["loss"]


@pytest.mark.parametrize("sched_file", group("schedule"), ids=lambda p: p.stem)
def test_every_config_composes(sched_file):
    sched = instantiate(OmegaConf.load(sched_file))
    assert isinstance(sched, Schedule)
    x0 = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for param_file in group("parameterization"):
        param = instantiate(OmegaConf.load(param_file))(schedule=sched)
        assert isinstance(param, Parameterization) and param.schedule is sched
        den = Denoiser(Linear(), param)
        for loss_file in group("loss"):
            if loss_file.stem == "hybrid":  # needs learned_variance: tests/diffusion/test_iddpm.py
                continue
            # tests/diffusion/test_consistency.py, test_continuous_consistency.py, test_mean_flow.py
            if loss_file.stem in ("ict", "ect", "cd", "scm", "meanflow"):
                continue
            loss_fn = instantiate(OmegaConf.load(loss_file))(schedule=sched, parameterization=param)
            assert isinstance(loss_fn, DiffusionLoss)
            loss, sigma = loss_fn(den, x0, generator=torch.Generator().manual_seed(1))
            assert torch.isfinite(loss).all() and (sigma > 0).all(), (
                param_file.stem,
                loss_file.stem,
            )


def test_config_values_match_the_papers():
    def load(g, n):
        return instantiate(OmegaConf.load(CONF / g / f"{n}.yaml"))

    assert load("schedule", "edm").sigma_max == 80.0
    assert load("schedule", "flow_shifted").shift == 3.0
    edm_loss = load("loss", "edm")(
        schedule=get_schedule("edm"), parameterization=EDMParam(get_schedule("edm"))
    )
    assert (edm_loss.noise.p_mean, edm_loss.noise.p_std) == (-1.2, 1.2)
    assert load("loss", "min_snr").keywords["weighting"].gamma == 5.0
    cfg = OmegaConf.load(CONF / "loss" / "edm.yaml")
    cfg.noise.p_std = -1.0
    with pytest.raises(Exception, match=r"p_std=-1.0: must be > 0") as info:
        instantiate(cfg)
    assert isinstance(info.value.__cause__ or info.value, ValueError)  # Hydra wraps the cause
