"""Consistency models: the parameterization's boundary, the losses' constants and closed forms
(iCT, ECT, distillation), the multistep sampler on an analytic target, and training to the
closed-form consistency function of Gaussian data."""

import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from diffusionlab.config import CONF_DIR
from diffusionlab.diffusion.consistency import (
    ConsistencyDistillationLoss,
    ECTLoss,
    GapSchedule,
    ICTLoss,
    huber_c,
    ict_num_levels,
    ict_pair_probabilities,
    karras_levels,
    pseudo_huber,
)
from diffusionlab.diffusion.discretizations import get_sigmas
from diffusionlab.diffusion.losses import StepScheduled
from diffusionlab.diffusion.parameterizations import (
    ConsistencyParam,
    Denoiser,
    EDMParam,
    get_parameterization,
)
from diffusionlab.diffusion.samplers import get_sampler
from diffusionlab.diffusion.schedules import get_schedule
from diffusionlab.errors import ConfigError

MU, S = 0.3, 0.5  # the 1-D Gaussian data N(MU, S^2) of the closed-form tests


def exact_f(x, sigma, mu=MU, s=S):
    """The PF-ODE's map from x at sigma to its end at 0 for N(mu, s^2) data."""
    return (
        mu + s * (x - mu) / math.sqrt(s * s + sigma * sigma)
        if isinstance(sigma, float)
        else (mu + s * (x - mu) / torch.sqrt(s * s + sigma * sigma))
    )


def gaussian_denoiser(mu=MU, s=S):
    """E[x0 | x at sigma] for N(mu, s^2) data: the exact teacher."""

    class D(nn.Module):
        def forward(self, x, sigma, class_labels=None, augment_labels=None):
            sig = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
            return mu + s * s / (s * s + sig * sig) * (x - mu)

    return D()


class Net(nn.Module):
    """F(c_in x, c_noise) = a(c_noise) c_in x + b(c_noise): a small MLP on c_noise, exact for
    Gaussian data (the consistency function is affine in x at every sigma)."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(1, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU())
        self.a, self.b = nn.Linear(64, 1), nn.Linear(64, 1)

    def forward(self, x, c_noise, class_labels=None, augment_labels=None):
        h = self.mlp(c_noise.view(-1, 1).to(self.a.weight.dtype))
        shape = (-1, *([1] * (x.ndim - 1)))
        return self.a(h).view(shape) * x + self.b(h).view(shape)


# ---------------------------------------------------------------- parameterization
@pytest.mark.parametrize("sigma_min", [1e-4, 0.002, 0.003, 0.02, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_boundary_condition_is_exact(sigma_min, dtype):
    """f(x; sigma_min) = x bit for bit, whatever the network outputs."""
    param = ConsistencyParam(get_schedule("edm"), sigma_min=sigma_min)
    c_skip, c_out, _, _ = param.coefficients(torch.tensor([sigma_min], dtype=dtype))
    assert float(c_skip) == 1.0 and float(c_out) == 0.0
    net = Net().to(dtype)
    with torch.no_grad():  # a network with large outputs: the skip path alone must survive
        net.b.bias.fill_(1e3)
    den = Denoiser(net, param)
    x = torch.randn(7, 1, dtype=dtype) * 40
    assert torch.equal(den(x, sigma_min), x)


def test_consistency_coefficients_closed_form_and_edm_inputs():
    sched = get_schedule("edm")
    param, edm = ConsistencyParam(sched, sigma_min=0.002), EDMParam(sched)
    sig = torch.tensor([0.002, 0.1, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = param.coefficients(sig)
    sd = 0.5
    assert torch.allclose(c_skip, sd**2 / ((sig - 0.002) ** 2 + sd**2))
    assert torch.allclose(c_out, (sig - 0.002) * sd / torch.sqrt(sig**2 + sd**2))
    e = edm.coefficients(sig)  # F sees what an EDM model's F sees (ECT starts from one)
    assert torch.allclose(c_in, e[2]) and torch.allclose(c_noise, e[3])
    assert get_parameterization("consistency", sched, sigma_min=0.01).sigma_min == 0.01
    assert ConsistencyParam.network_config(
        {"_target_": "x.ConsistencyParam", "sigma_min": 0.002, "sigma_data": 0.5}
    ) == {"_target_": f"{EDMParam.__module__}.EDMParam", "sigma_data": 0.5}


def test_edm_coefficients_in_training_as_ects_ecmprecond():
    """train_coefficients="edm" is ECT's ECMPrecond: EDM's c_skip / c_out while the denoiser
    trains, the consistency ones (exact boundary) in eval mode; F's inputs and F are the same,
    and the losses then take x0 only where r = 0 (ECMLoss's mask r > 0), with t unclamped."""
    sched = get_schedule("edm")
    ect = ConsistencyParam(sched, sigma_min=0.002, train_coefficients="edm")
    plain, edm = ConsistencyParam(sched, sigma_min=0.002), EDMParam(sched)
    sig = torch.tensor([0.001, 0.002, 0.1, 80.0], dtype=torch.float64)
    for a, b in zip(ect.coefficients(sig, training=True), edm.coefficients(sig)):
        assert torch.equal(a, b)
    for a, b in zip(ect.coefficients(sig), plain.coefficients(sig)):
        assert torch.equal(a, b)
    torch.manual_seed(0)
    den = Denoiser(Net().double(), ect)
    x = torch.randn(4, 1, dtype=torch.float64)
    ref = Denoiser(den.net, edm)
    assert torch.equal(den.train()(x, sig), ref(x, sig))
    assert torch.equal(den.eval()(x, sig[1:2]), x) and not torch.equal(ref(x, sig[1:2]), x)
    assert ECTLoss(sched, ect).boundary == 0.0 and ECTLoss(sched, plain).boundary == 0.002
    assert "train_coefficients" not in ConsistencyParam.network_config(
        {"_target_": "x.ConsistencyParam", "sigma_min": 0.002, "train_coefficients": "edm"}
    )
    with pytest.raises(ValueError, match="train_coefficients"):
        ConsistencyParam(sched, train_coefficients="vp")


# ---------------------------------------------------------------- constants
def test_pseudo_huber_and_ict_constant():
    d = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert torch.allclose(pseudo_huber(d, 0.0), torch.tensor([5.0, 0.0]))
    c = 0.03
    assert torch.allclose(pseudo_huber(d, c), torch.tensor([math.sqrt(25 + c * c) - c, 0.0]))
    assert huber_c(None, (3, 32, 32)) == pytest.approx(0.00054 * math.sqrt(3072))  # 0.0299
    assert huber_c(None, (3, 32, 32)) == pytest.approx(0.03, abs=1e-4)
    assert huber_c(0.1, (1, 16, 16)) == 0.1


def test_ict_curriculum_eq8():
    """N(k) = min(s0 2^floor(k/K'), s1) + 1, K' = floor(K / (log2 floor(s1/s0) + 1)): with the
    paper's K = 400k, K' = 50k and N goes 11, 21, 41, ..., 1281 (8 stages)."""
    assert [ict_num_levels(k, 400_000) for k in (0, 49_999, 50_000, 100_000)] == [11, 11, 21, 41]
    assert ict_num_levels(349_999, 400_000) == 641
    assert ict_num_levels(350_000, 400_000) == 1281 == ict_num_levels(10**9, 400_000)
    assert ict_num_levels(0, 3) == 11  # K' >= 1 for tiny runs
    loss = ICTLoss(get_schedule("edm"), ConsistencyParam(get_schedule("edm")), total_steps=800)
    assert isinstance(loss, StepScheduled)
    loss.set_step(100)
    assert loss.num_levels() == 21


def test_ict_levels_and_lognormal_pair_probabilities_eq9():
    levels = karras_levels(11, 0.002, 80.0)
    assert levels[0].item() == pytest.approx(0.002) and levels[-1].item() == pytest.approx(80.0)
    grid = get_sigmas("karras", 11, sigma_min=0.002, sigma_max=80.0)[:-1].flip(0)
    assert torch.allclose(levels, grid)

    def phi(v):  # the log-normal CDF of ln sigma ~ N(-1.1, 2^2)
        return 0.5 * (1 + math.erf((math.log(v) + 1.1) / (2.0 * math.sqrt(2))))

    p = ict_pair_probabilities(levels)
    want = torch.tensor([phi(b) - phi(a) for a, b in zip(levels[:-1], levels[1:], strict=True)])
    assert torch.allclose(p, want.double() / want.sum(), atol=1e-12)
    # the drawn pairs follow these probabilities and are adjacent levels
    loss = ICTLoss(get_schedule("edm"), ConsistencyParam(get_schedule("edm")), total_steps=10)
    gen = torch.Generator().manual_seed(0)
    t, r = loss.pair(200_000, gen, torch.device("cpu"))
    idx = torch.searchsorted(levels.float(), r)
    assert torch.allclose(levels[idx + 1].float(), t)
    freq = torch.bincount(idx, minlength=10).double() / len(idx)
    assert torch.allclose(freq, p, atol=3e-3)


def test_ect_gap_schedule_matches_reference_formula():
    """r = clamp(t (1 - q^-(stage+1) (1 + k sigmoid(-b t))), 0) (locuslab/ect ECMLoss)."""
    gap = GapSchedule(q=2.0, double_every=25_000, k=8.0, b=1.0)
    t = torch.tensor([0.002, 0.05, 0.3, 1.0, 5.0, 80.0], dtype=torch.float64)
    for step, stage in ((0, 0), (24_999, 0), (25_000, 1), (190_000, 7)):
        want = (t * (1 - (1 / 2 ** (stage + 1)) * (1 + 8 * torch.sigmoid(-t)))).clamp_min(0)
        assert torch.allclose(gap.r(t, step), want)
    assert float(gap.r(torch.tensor(0.1), 0)) == 0.0  # stage 0: small t pair with r = 0 (x0)
    const = GapSchedule(mapping="const", double_every=10)
    assert torch.allclose(const.r(t, 25), t * (1 - 1 / 8))


# ---------------------------------------------------------------- the objective
def _fixed(loss, t, r, z):
    loss.pair = lambda n, gen, dev: (t, r)
    loss.noise = lambda x0, gen: z
    return loss


def test_ect_loss_equals_reference_on_the_same_draws():
    """The per-sample ECT loss is ECMLoss's (locuslab/ect main): sqrt(||f(x_t, t) -
    f(x_r, r)||^2) / (t - r), with x0 itself as the target where r = 0; its ImageNet branch's
    weight 1/t^2 + 1/sigma_data^2 with ``weighting="snr_plus_k"``."""
    torch.manual_seed(0)
    sched = get_schedule("edm")
    param = ConsistencyParam(sched, sigma_min=0.002)
    den = Denoiser(Net(), param)
    loss = ECTLoss(sched, param)
    x0 = torch.randn(4, 3)
    t = torch.tensor([0.05, 0.5, 2.0, 30.0])
    r = loss.gap.r(t.double(), 0).float()
    assert float(r[0]) == 0.0 and float(r[-1]) > 0
    z = torch.randn(4, 3)
    got, sig = _fixed(loss, t, r, z)(den, x0)
    with torch.no_grad():
        f_r = den(x0 + r[:, None] * z, r.clamp_min(1e-3))
    target = torch.where((r > 0)[:, None], f_r, x0)
    f_t = den(x0 + t[:, None] * z, t)
    norm = (f_t - target).square().sum(1).sqrt()
    assert torch.allclose(got, norm / (t - r), rtol=1e-5) and torch.equal(sig, t)
    got.sum().backward()  # the gradient flows through f(x_t) only
    assert all(p.grad is not None for p in den.parameters())
    loss.weighting = "snr_plus_k"
    got, _ = loss(den, x0)
    assert torch.allclose(got, norm * (1 / t**2 + 1 / 0.25), rtol=1e-5)


def test_ict_loss_pseudo_huber_over_gap():
    torch.manual_seed(1)
    sched = get_schedule("edm")
    param = ConsistencyParam(sched)
    den = Denoiser(Net(), param)
    loss = ICTLoss(sched, param, total_steps=10)
    x0, z = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t, r = torch.tensor([0.01, 1.0, 70.0]), torch.tensor([0.002, 0.8, 60.0])
    got, _ = _fixed(loss, t, r, z)(den, x0)
    c = 0.00054 * 4.0
    with torch.no_grad():
        target = den(x0 + r.view(-1, 1, 1, 1) * z, r)
    target[0] = x0[0] + 0.002 * z[0]  # r at the boundary: f(x_r) = x_r
    diff = (den(x0 + t.view(-1, 1, 1, 1) * z, t) - target).flatten(1)
    want = (torch.sqrt(diff.square().sum(1) + c * c) - c) / (t - r)
    assert torch.allclose(got, want, rtol=1e-5)


def test_consistency_losses_from_the_configs():
    sched = get_schedule("edm")
    param = instantiate(OmegaConf.load(f"{CONF_DIR}/parameterization/consistency.yaml"))(
        schedule=sched
    )
    for name, cls in (("ect", ECTLoss), ("cd", ConsistencyDistillationLoss)):
        loss = instantiate(OmegaConf.load(f"{CONF_DIR}/loss/{name}.yaml"))(
            schedule=sched, parameterization=param
        )
        assert type(loss) is cls and loss.boundary == 0.002
    cfg = OmegaConf.load(f"{CONF_DIR}/loss/ict.yaml")
    cfg.total_steps = 100
    assert isinstance(instantiate(cfg)(schedule=sched, parameterization=param), ICTLoss)
    with pytest.raises(ValueError, match="weighting"):
        ECTLoss(sched, param, weighting="lpips")


def test_losses_draw_per_sample_and_follow_the_step():
    """A sample's pair and noise come from its own seed: the same whatever the batch."""
    from diffusionlab.diffusion.batched_rng import BatchedGenerator

    sched = get_schedule("edm")
    loss = ECTLoss(sched, ConsistencyParam(sched))
    seeds = torch.arange(6)
    t_all, r_all = loss.pair(6, BatchedGenerator(seeds), torch.device("cpu"))
    t_part, _ = loss.pair(2, BatchedGenerator(seeds[4:]), torch.device("cpu"))
    assert torch.equal(t_all[4:], t_part)
    loss.set_step(10**6)  # late stages: r -> t
    _, r_late = loss.pair(6, BatchedGenerator(seeds), torch.device("cpu"))
    assert torch.all(r_late >= r_all) and torch.all((t_all - r_late) < 1e-3 * t_all + 1e-6)


class CondNet(nn.Module):
    """A denoiser of 1-D data whose output reads a pooled condition ``cond_vector``
    (networks/context.py), or the one it was built with when called without."""

    def __init__(self, baked=None):
        super().__init__()
        self.baked = baked

    def forward(self, x, sigma, class_labels=None, augment_labels=None, cond_vector=None):
        v = self.baked if cond_vector is None else cond_vector
        sig = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1)
        return x / (1 + sig) + v.sum(1, keepdim=True) * sig / (1 + sig)


def test_every_consistency_loss_gives_the_condition_to_both_points_and_the_teacher():
    """A text or image condition reaches f at t, f at r and the distillation teacher unchanged:
    the loss with ``cond`` equals the loss of a network that holds the same condition."""
    sched = get_schedule("edm")
    param = ConsistencyParam(sched)
    g = torch.Generator().manual_seed(0)
    v, x0 = torch.randn(5, 3, generator=g), torch.randn(5, 1, generator=g)
    cd = ConsistencyDistillationLoss(sched, param, gap={"q": 2.0, "double_every": 1})
    for loss in (ICTLoss(sched, param, total_steps=10), ECTLoss(sched, param), cd):
        loss.set_step(2)
        if loss is cd:
            loss.set_teacher(CondNet())
        given, _ = loss(
            CondNet(), x0, generator=torch.Generator().manual_seed(0), cond={"cond_vector": v}
        )
        if loss is cd:
            loss.set_teacher(CondNet(baked=v))
        held, _ = loss(CondNet(baked=v), x0, generator=torch.Generator().manual_seed(0))
        other, _ = loss(CondNet(baked=-v), x0, generator=torch.Generator().manual_seed(0))
        assert torch.equal(given, held), type(loss).__name__
        assert not torch.allclose(given, other), type(loss).__name__


# ---------------------------------------------------------------- distillation
@pytest.mark.parametrize("sampler", ["heun", "euler", "dpmpp_2m"])
def test_distillation_teacher_step_follows_the_pf_ode(sampler):
    """x_r from the teacher sampler's step (scale-invariant common grid) is the exact PF-ODE
    solution of Gaussian data to the solver's order."""
    sched = get_schedule("edm")
    loss = ConsistencyDistillationLoss(
        sched,
        ConsistencyParam(sched),
        teacher_sampler={"name": sampler},
        gap={"q": 2.0, "double_every": 1},
    )
    loss.set_teacher(gaussian_denoiser())
    loss.set_step(3)  # r / t = 1 - 1/16
    t = torch.tensor([0.01, 0.3, 1.0, 20.0])
    z = torch.randn(4, 1, generator=torch.Generator().manual_seed(0))
    x_t = MU + z * torch.sqrt(S * S + t[:, None] ** 2)
    x_r = loss.point_at(None, None, x_t, t, t * (1 - 1 / 16))
    r = t * (1 - 1 / 16)
    exact = MU + (x_t - MU) * torch.sqrt(S * S + r[:, None] ** 2) / torch.sqrt(
        S * S + t[:, None] ** 2
    )
    # Heun's local error is O(h^3): 4e-5 at t = 1 for this draw (in float64 too); Euler's O(h^2)
    tol = {"heun": 1e-4, "euler": 5e-3, "dpmpp_2m": 5e-3}[sampler]
    assert torch.allclose(x_r, exact, atol=tol)


def test_distillation_refuses_without_a_teacher_or_a_step_loop():
    sched = get_schedule("edm")
    param = ConsistencyParam(sched)
    loss = ConsistencyDistillationLoss(sched, param)
    den = Denoiser(Net(), param)
    with pytest.raises(ConfigError, match="teacher"):
        loss(den, torch.randn(2, 1))
    with pytest.raises(ConfigError, match="teacher_sampler"):
        ConsistencyDistillationLoss(sched, param, teacher_sampler={"name": "rk45"})
    with pytest.raises(ValueError, match="const"):
        ConsistencyDistillationLoss(sched, param, gap={"mapping": "sigmoid"})


# ---------------------------------------------------------------- sampler
def test_consistency_sampler_on_the_exact_consistency_function():
    """With f the exact map of N(mu, s^2), one step and multistep sampling both give N(mu, s^2)."""
    torch.manual_seed(0)

    def f(x, sigma):  # sigma: [B]
        return exact_f(x, sigma[:, None])

    for nfe in (1, 2, 4):
        sampler = get_sampler("consistency", sigma_min=0.0)
        sig = get_sigmas("consistency", nfe, sigma_min=0.002, sigma_max=80.0)
        assert len(sig) == nfe + 1 and float(sig[-1]) == 0.0
        x = torch.randn(20_000, 1, dtype=torch.float64) * float(sig[0])
        gen = torch.Generator().manual_seed(nfe)
        out = sampler(f, x, sig, generator=gen)
        assert sampler.nfe == nfe
        assert abs(out.mean().item() - MU) < 0.015 and abs(out.std().item() - S) < 0.015


def test_consistency_and_list_discretizations():
    sig = get_sigmas("consistency", 2, sigma_min=0.002, sigma_max=80.0)
    karras3 = get_sigmas("karras", 3, sigma_min=0.002, sigma_max=80.0)
    assert torch.allclose(sig[:2], karras3[:2]) and float(sig[2]) == 0.0
    chosen = get_sigmas("list", 2, sigmas=[80, 0.821])
    assert chosen.tolist() == [80.0, 0.821, 0.0]
    with pytest.raises(ValueError, match="2 levels"):
        get_sigmas("list", 3, sigmas=[80, 0.821])
    with pytest.raises(ValueError, match="'list'"):
        get_sigmas("karras", 2, sigma_min=0.002, sigma_max=80.0, sigmas=[80, 1])


def test_consistency_sampler_config():
    from diffusionlab.sampling.spec import SamplerSpec

    spec = SamplerSpec.from_config(OmegaConf.load(f"{CONF_DIR}/sampler/consistency.yaml"))
    assert spec.name == "consistency" and spec.nfe == 1


# ---------------------------------------------------------------- training: closed form
def test_consistency_training_converges_to_the_closed_form_map():
    """ECT from scratch on 1-D N(0.3, 0.5^2) data (1500 steps of batch 512, Adam 1e-2 with a
    cosine decay, the gap halving every 250 steps; about 5 CPU seconds) learns the PF-ODE's map
    f(x; sigma) = mu + s (x - mu) / sqrt(s^2 + sigma^2) over sigma in [0.01, 80] and x within
    2.5 std of the marginal: mean abs error below 0.02 (measured 0.010) and max below 0.1
    (measured 0.050), against data of std 0.5."""
    torch.manual_seed(0)
    sched = get_schedule("edm")
    param = ConsistencyParam(sched, sigma_min=0.002)
    den = Denoiser(Net(), param)
    loss = ECTLoss(sched, param, gap={"q": 2.0, "double_every": 250})
    err = fit_gaussian(den, loss)
    assert err.mean() < 0.02 and err.max() < 0.1


def fit_gaussian(den: Denoiser, loss: nn.Module, steps: int = 1500) -> torch.Tensor:
    """Train ``den`` with ``loss`` on N(MU, S^2) data (:func:`train_on_gaussian`); return
    |f - exact_f| over sigma in [0.01, 80] (25 levels) and x within 2.5 std of the marginal
    (41 points)."""
    train_on_gaussian(den, loss, steps)
    sig = torch.logspace(-2, math.log10(80), 25).repeat_interleave(41)
    u = torch.linspace(-2.5, 2.5, 41).repeat(25)
    x = MU + u * torch.sqrt(S * S + sig**2)
    with torch.no_grad():
        return (den(x[:, None], sig)[:, 0] - exact_f(x, sig)).abs()


def train_on_gaussian(den: Denoiser, loss: nn.Module, steps: int = 1500) -> None:
    """Train ``den`` (and the loss's own parameters) with ``loss`` on N(MU, S^2) data, batch 512,
    Adam 1e-2 with a cosine decay."""
    opt = torch.optim.Adam([*den.parameters(), *loss.parameters()], lr=1e-2)
    decay = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps))
    )
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        loss.set_step(step)
        x0 = MU + S * torch.randn(512, 1, generator=gen)
        per, _ = loss(den, x0, generator=gen)
        opt.zero_grad()
        per.mean().backward()
        opt.step()
        decay.step()
