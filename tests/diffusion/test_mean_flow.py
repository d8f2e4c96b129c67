"""MeanFlow and the flow-map parameterization (diffusion/mean_flow.py,
parameterizations.FlowMapParam, samplers.flow_map) on closed forms: for N(mu, s^2) data the
PF-ODE's flow map is Phi(x; sigma -> s') = mu + (x - mu) sqrt(s^2 + s'^2) / sqrt(s^2 + sigma^2)."""

import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from diffusionlab.config import CONF_DIR
from diffusionlab.diffusion.batched_rng import BatchedGenerator
from diffusionlab.diffusion.mean_flow import MeanFlowLoss
from diffusionlab.diffusion.parameterizations import Denoiser, EDMParam, FlowMapParam
from diffusionlab.diffusion.samplers import get_sampler
from diffusionlab.diffusion.schedules import get_schedule
from diffusionlab.errors import ConfigError
from diffusionlab.networks.mlp import MLP

from .test_consistency import MU, S, gaussian_denoiser, train_on_gaussian

SCHED = get_schedule("edm")
END = FlowMapParam.end_features


def exact_map(x, sigma, end, mu=MU, s=S):
    """The PF-ODE's solution at ``end`` from x at ``sigma`` for N(mu, s^2) data."""
    return mu + (x - mu) * torch.sqrt(s * s + end * end) / torch.sqrt(s * s + sigma * sigma)


class ExactFlowMap(nn.Module):
    """The two-time denoiser of N(mu, s^2) data: D = (Phi - (s'/sigma) x) / (1 - s'/sigma),
    E[x0 | x] at s' = sigma."""

    def __init__(self, mu: float = MU, s: float = S) -> None:
        super().__init__()
        self.mu, self.s = mu, s

    def forward(self, x, sigma, class_labels=None, augment_labels=None, sigma_end=None):
        mu, s = self.mu, self.s
        sig = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1)
        end = sig if sigma_end is None else torch.as_tensor(sigma_end, dtype=x.dtype).reshape(-1, 1)
        ratio = end / sig
        same = (sig - end).abs() < 1e-12
        step = (exact_map(x, sig, end, mu, s) - ratio * x) / torch.where(same, 1.0, 1 - ratio)
        return torch.where(same, mu + s * s / (s * s + sig * sig) * (x - mu), step)


class TwoTimeNet(nn.Module):
    """F(c_in x; c_noise, features of the gap) = a c_in x + b, a and b an MLP of both times:
    exact for Gaussian data (the flow map is affine in x)."""

    vector_dim = END

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(1 + END, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU())
        self.a, self.b = nn.Linear(64, 1), nn.Linear(64, 1)

    def forward(self, x, c_noise, class_labels=None, augment_labels=None, cond_vector=None):
        h = self.mlp(torch.cat([c_noise.view(-1, 1), cond_vector], 1).to(self.a.weight.dtype))
        return self.a(h) * x + self.b(h)


# ---------------------------------------------------------------- parameterization and sampler
def test_flow_map_is_the_identity_at_its_start_and_a_denoiser_there():
    """D(x; sigma) is D(x; sigma, sigma), so the map from sigma to itself is x; the second time
    changes D; the embedding of the gap t - r (the network's own sinusoidal one, cos(h) first)
    reaches the network after a condition's own vector (zeros when the condition is absent)."""
    torch.manual_seed(0)
    param = FlowMapParam(SCHED)
    net = MLP(in_dim=2, vector_dim=4 + END, hidden_dim=32, num_blocks=1, emb_dim=16)
    with torch.no_grad():  # zero-initialised branches would hide the embedding
        for w in net.parameters():
            w.normal_(0, 0.5)
    den = Denoiser(net, param).eval()
    x, sigma = torch.randn(5, 2), torch.rand(5) * 5 + 0.1
    d_same = den(x, sigma, sigma_end=sigma)
    assert torch.equal(d_same, den(x, sigma))
    assert not torch.allclose(d_same, den(x, sigma, sigma_end=torch.zeros(5)))
    seen = {}
    net.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    den(x, sigma, sigma_end=sigma / 2)
    gap = sigma / (1 + sigma) - (sigma / 2) / (1 + sigma / 2)
    assert seen["cond_vector"].shape == (5, 4 + END)
    assert torch.equal(seen["cond_vector"][:, :4], torch.zeros(5, 4))
    assert torch.allclose(seen["cond_vector"][:, 4], torch.cos(gap))
    assert torch.allclose(seen["cond_vector"][:, 4 + END // 2], torch.sin(gap))
    vec = torch.randn(5, 4)
    den(x, sigma, sigma_end=sigma / 2, cond_vector=vec)
    assert torch.equal(seen["cond_vector"][:, :4], vec)


@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_sampler_on_the_exact_flow_map_draws_the_data(nfe):
    """sampler=flow_map on the exact flow map of N(MU, S^2) gives N(MU, S^2) at 1, 2 and 4 NFE
    (each step the exact ODE solution), while Euler at the same NFE does not; given a denoise
    that takes no ``sigma_end`` it is Euler."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, 1, generator=gen, dtype=torch.float64) * 80
    sigmas = torch.tensor([80.0, 2.0, 0.5, 0.1][:nfe] + [0.0], dtype=torch.float64)
    den = ExactFlowMap()
    out = get_sampler("flow_map")(lambda x, s, **kw: den(x, s, **kw), x, sigmas)
    assert abs(out.mean() - MU) < 0.015 and abs(out.std() - S) < 0.015
    exact = exact_map(x, sigmas[0], sigmas[-1])
    assert torch.allclose(out, exact, atol=1e-9)
    euler = get_sampler("euler")(lambda x, s: den(x, s), x, sigmas)
    assert abs(euler.std() - S) > 0.05 or nfe == 1  # one Euler step to 0 is D(x; 80): exact too
    # a denoise without the keyword (a one-time model's) gets Euler's steps
    assert torch.equal(get_sampler("flow_map")(lambda x, s: den(x, s), x, sigmas), euler)


# ---------------------------------------------------------------- the loss
def test_target_of_the_exact_flow_map_is_its_average_velocity():
    """The MeanFlow identity (eq. 6) in our coordinates: with the exact flow map of Gaussian data
    and the marginal velocity v(z_t, t) = u(z_t, t, t), u_tgt = v - (t - r) du/dt equals
    u(z_t, r, t) = (z_t - z_r) / (t - r) (float64, 1e-9): the conversion between rectified-flow
    time and sigma-space and the JVP through D are right."""
    torch.manual_seed(0)
    den = ExactFlowMap()
    t = torch.rand(64, dtype=torch.float64) * 0.98 + 0.01
    r = t * torch.rand(64, dtype=torch.float64)
    sig_r = r / (1 - r)
    z = torch.randn(64, 1, dtype=torch.float64) * 0.7
    u_of = MeanFlowLoss.average_velocity(den, sig_r, torch.float64)
    v = MeanFlowLoss.average_velocity(den, t / (1 - t), torch.float64)(z, t)
    z_r = (1 - r)[:, None] * exact_map(z / (1 - t)[:, None], (t / (1 - t))[:, None], sig_r[:, None])
    u = u_of(z, t)
    assert torch.allclose(u, (z - z_r) / (t - r)[:, None], atol=1e-10)
    assert torch.allclose(MeanFlowLoss.target(u_of, z, t, r, v), u, atol=1e-9)


def test_distillation_target_of_the_exact_flow_map_is_exact():
    """velocity=teacher with the exact Gaussian teacher: the loss of the exact flow map is 0 for
    every sample (its target is u itself, no data noise), and that of a wrong map is not."""
    param = FlowMapParam(SCHED)
    loss = MeanFlowLoss(SCHED, param, velocity="teacher", ratio=0.5, power=0.0)
    assert loss.needs_teacher and not MeanFlowLoss(SCHED, param).needs_teacher
    loss.set_teacher(gaussian_denoiser())
    x0 = MU + S * torch.randn(
        256, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    err, _ = loss(ExactFlowMap(), x0, generator=torch.Generator().manual_seed(1))
    assert err.max() < 1e-16
    wrong = loss(ExactFlowMap(s=0.4), x0, generator=torch.Generator().manual_seed(1))[0]
    assert wrong.mean() > 1e-3


def test_time_pairs():
    """logit t ~ N(P_mean, P_std^2) (ln sigma: log-normal), t >= r, r = t for a share
    1 - ratio; each sample's own draws (a batch split in two draws the same)."""
    loss = MeanFlowLoss(SCHED, FlowMapParam(SCHED), p_mean=-0.4, p_std=1.0, ratio=0.25)
    seeds = torch.arange(40_000) * 7919 + 3
    sig_t, sig_r = loss.draw_sigmas(len(seeds), BatchedGenerator(seeds), torch.device("cpu"))
    assert bool((sig_r <= sig_t).all())
    assert abs((sig_r < sig_t).double().mean() - 0.25) < 0.01
    # ln sigma_t is the larger of two N(-0.4, 1) draws: mean -0.4 + 1 / sqrt(pi)
    assert abs(sig_t.log().mean() - (-0.4 + 1 / math.sqrt(math.pi))) < 0.02
    pair = sig_r < sig_t  # both draws kept: pooled, N(-0.4, 1)
    pooled = torch.cat([sig_t[pair], sig_r[pair]]).log()
    assert abs(pooled.mean() + 0.4) < 0.03 and abs(pooled.std() - 1) < 0.03
    lo, hi = loss.draw_sigmas(100, BatchedGenerator(seeds[:100]), torch.device("cpu"))
    assert torch.equal(lo, sig_t[:100]) and torch.equal(hi, sig_r[:100])


def test_needs_a_flow_map_and_checks_options():
    with pytest.raises(ConfigError, match="parameterization=flow_map"):
        MeanFlowLoss(SCHED, EDMParam(SCHED))
    for bad in ({"ratio": 1.5}, {"p_std": 0}, {"power": -1}, {"c": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MeanFlowLoss(SCHED, FlowMapParam(SCHED), **bad)
    cfg = OmegaConf.load(f"{CONF_DIR}/loss/meanflow.yaml")
    loss = instantiate(cfg)(schedule=SCHED, parameterization=FlowMapParam(SCHED))
    assert (loss.p_mean, loss.p_std, loss.ratio, loss.power, loss.c) == (-0.4, 1.0, 0.25, 1.0, 1e-3)


@pytest.mark.parametrize(
    ("velocity", "one_bound", "quarter_bound"),
    [("data", (0.08, 0.4), (0.03, 0.15)), ("teacher", (0.05, 0.2), (0.02, 0.06))],
)
def test_training_converges_to_the_closed_form_map(velocity, one_bound, quarter_bound):
    """MeanFlow from scratch on 1-D N(0.3, 0.5^2) with the paper's ImageNet constants but half
    the pairs r != t, 1500 steps of batch 512, Adam 1e-2 with a cosine decay (about 8 CPU s),
    from the data's velocity or distilled from the exact Gaussian teacher's: over sigma in
    [0.01, 10] (ln sigma within 2.4 std of the training draws) and x within 2.5 std of the
    marginal, the one-step map D(x; sigma, 0) is mu + s (x - mu) / sqrt(s^2 + sigma^2) and the
    map to sigma / 4 the PF-ODE's solution there, within the stated mean and max errors
    (measured from the data: 0.053 and 0.28 for one step, 0.015 and 0.088 to sigma / 4;
    distilled: 0.030 and 0.11, 0.011 and 0.032; regressing D on the exact map with the same network and budget gives about
    0.03 in this range)."""
    torch.manual_seed(0)
    param = FlowMapParam(SCHED)
    den = Denoiser(TwoTimeNet(), param)
    loss = MeanFlowLoss(SCHED, param, velocity=velocity, ratio=0.5)
    if velocity == "teacher":
        loss.set_teacher(gaussian_denoiser())
    train_on_gaussian(den, loss)
    sig = torch.logspace(-2, 1, 25).repeat_interleave(41)
    u = torch.linspace(-2.5, 2.5, 41).repeat(25)
    x = MU + u * torch.sqrt(S * S + sig**2)
    with torch.no_grad():
        one = den(x[:, None], sig, sigma_end=torch.zeros_like(sig))[:, 0]
        d_quarter = den(x[:, None], sig, sigma_end=sig / 4)[:, 0]
    quarter = x + (sig / 4 - sig) / sig * (x - d_quarter)
    err_one = (one - exact_map(x, sig, torch.zeros_like(sig))).abs()
    err_quarter = (quarter - exact_map(x, sig, sig / 4)).abs()
    assert err_one.mean() < one_bound[0] and err_one.max() < one_bound[1]
    assert err_quarter.mean() < quarter_bound[0] and err_quarter.max() < quarter_bound[1]
