"""Continuous-time consistency (sCM): the gradient is the discrete consistency loss's limit as the
gap goes to 0, the loss equals sCM's TrigFlow formulas (FastGen's ``SCMModel``) computed in
t-space on the same draws, it refuses coefficients other than TrigFlow's, and sCT / sCD train to
the closed-form consistency function of Gaussian data."""

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from diffusionlab.config import CONF_DIR
from diffusionlab.diffusion.continuous_consistency import SCMLoss, total_derivative
from diffusionlab.diffusion.parameterizations import ConsistencyParam, Denoiser, EDMParam
from diffusionlab.diffusion.schedules import get_schedule
from diffusionlab.errors import ConfigError

from .test_consistency import MU, Net, S, fit_gaussian, gaussian_denoiser

SD = 0.5  # sigma_data


class MixNet(nn.Module):
    """F(c_in x, c_noise) nonlinear in both inputs and mixing the dims, so that the JVP's x and
    sigma parts both matter."""

    def __init__(self, dim: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim + 1, 32), nn.SiLU(), nn.Linear(32, dim))

    def forward(self, x, c_noise, class_labels=None, augment_labels=None):
        return self.body(torch.cat([x, c_noise.view(-1, 1).to(x.dtype)], 1))


class Exact64(nn.Module):
    """f = c_skip x + c_out F(c_in x; ln(sigma) / 4) all in float64 (``Denoiser`` hands F a
    float32 time input, which would blur the finite differences)."""

    def __init__(self, param: ConsistencyParam):
        super().__init__()
        self.net, self.param = MixNet().double(), param

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        c_skip, c_out, c_in, c_noise = self.param.coefficients(sigma, check=False, training=True)
        return c_skip[:, None] * x + c_out[:, None] * self.net(c_in[:, None] * x, c_noise)


def _fixed(loss: SCMLoss, sigma: torch.Tensor, z: torch.Tensor) -> SCMLoss:
    """The loss with the given draws: sigma and the noise."""
    loss.draw_sigma = lambda n, gen, dev: sigma
    loss.noise = lambda x0, gen: z
    return loss


def _grads(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters()])


def _setup(**options):
    torch.manual_seed(0)
    sched = get_schedule("edm")
    param = ConsistencyParam(sched, sigma_min=0.0)
    den = Exact64(param)
    loss = SCMLoss(sched, param, **options)
    x0 = torch.randn(5, 3, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.2, 1.0, 5.0, 60.0], dtype=torch.float64)
    z = torch.randn(5, 3, dtype=torch.float64)
    return den, _fixed(loss, sigma, z), x0, sigma, z


def test_gradient_is_the_discrete_losses_limit():
    """Without normalisation and weighting the sCM gradient is, per sample, rho^2 / (sigma_d
    sigma D) times the gradient of the discrete loss ||f(x_sigma) - sg f(x_sigma-h)||^2 / h
    (same z) as h -> 0: the JVP, its sign and the TrigFlow algebra in sigma-space."""
    opts = dict(warmup_steps=0, tangent_norm="none", prior_weighting=False, adaptive=False)
    den, loss, x0, sigma, z = _setup(**opts)
    per, got_sigma = loss(den, x0)
    assert torch.equal(got_sigma, sigma)
    per.sum().backward()
    scm = _grads(den)
    den.zero_grad()
    h = 1e-6 * sigma
    col = sigma[:, None]
    with torch.no_grad():
        target = den(x0 + (col - h[:, None]) * z, sigma - h)
    disc = (den(x0 + col * z, sigma) - target).square().sum(1) / h
    k = (sigma**2 + SD**2) / (SD * sigma * 3)
    (k * disc).sum().backward()
    torch.testing.assert_close(scm, _grads(den), rtol=1e-4, atol=1e-8)


def test_loss_equals_scms_trigflow_formulas():
    """Per-sample loss and gradients equal sCM's (FastGen ``_scm_pred_to_loss``) computed in
    TrigFlow's t-space, with the JVP of F_trig along (cos t sin t dx_t/dt, cos t sin t): warm-up
    r = 0.3, RMS normalisation with c = 0.1, prior weight 1 / sigma and a learned u."""
    den, loss, x0, sigma, z = _setup(warmup_steps=10)
    loss.set_step(3)
    with torch.no_grad():
        loss.adaptive.linear.weight.normal_(0, 0.3)  # u(sigma) not 0
    got, _ = loss(den, x0)
    got.sum().backward()
    got_grads = _grads(den)
    den.zero_grad()

    t = torch.atan(sigma / SD)[:, None]  # TrigFlow time; x_t = cos t x0 + sin t sigma_d z
    cos, sin = torch.cos(t), torch.sin(t)
    x_t = cos * x0 + sin * SD * z

    def f_trig(xt, tt):  # F_trig(x_t, t) of f = cos t x_t - sin t sigma_d F_trig
        tt = tt.reshape(-1, 1)
        f = den(xt / torch.cos(tt), SD * torch.tan(tt).reshape(-1))
        return (torch.cos(tt) * xt - f) / (SD * torch.sin(tt))

    dxt_dt = cos * SD * z - sin * x0  # sCT
    with torch.no_grad():
        cs = (cos * sin).reshape(-1)
        _, f_jvp = torch.func.jvp(f_trig, (x_t, t.reshape(-1)), (cs[:, None] * dxt_dt, cs))
    F = f_trig(x_t, t.reshape(-1))
    F_ = F.detach()
    g = -(cos**2) * (SD * F_ - dxt_dt) - 0.3 * (cos * sin * x_t + SD * f_jvp)
    g = g / (g.square().mean(1, keepdim=True).sqrt() + 0.1)
    u = loss.adaptive.logvar(sigma)
    want = (1 / sigma) / u.exp() * (F - F_ - g).square().mean(1) + u
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
    want.sum().backward()
    torch.testing.assert_close(got_grads, _grads(den), rtol=1e-6, atol=1e-10)


def test_distillation_tangent_is_the_teachers_pf_ode():
    """sCD's dx/dsigma is the teacher's (x - D(x; sigma)) / sigma: with an exact Gaussian
    teacher and a model equal to the exact consistency function, g (before normalisation) is 0:
    f is constant along the teacher's trajectories."""
    sched = get_schedule("edm")
    param = ConsistencyParam(sched, sigma_min=0.0)
    loss = SCMLoss(sched, param, tangent="teacher", warmup_steps=0)
    assert loss.needs_teacher and not SCMLoss(sched, param).needs_teacher
    x = torch.randn(6, 1, dtype=torch.float64)
    sigma = torch.logspace(-2, 1.5, 6, dtype=torch.float64)
    with pytest.raises(ConfigError, match="loss=scm needs its teacher"):
        loss.velocity(x, sigma, torch.zeros_like(x), None)
    loss.set_teacher(gaussian_denoiser())
    v = loss.velocity(x, sigma, torch.zeros_like(x), None)

    def exact(y, s):
        return MU + S * (y - MU) / torch.sqrt(S * S + s[:, None] ** 2)

    f, df = total_derivative(exact, x, sigma, v)
    assert df.abs().max() < 1e-12
    g = loss.tangent_g(x, sigma, v, f, df, 1.0)
    assert g.abs().max() < 1e-12
    # and along the data tangent z it is not
    _, df_z = total_derivative(exact, x, sigma, torch.ones_like(x))
    assert df_z.abs().min() > 1e-3


@pytest.mark.parametrize(
    ("kwargs", "ok"),
    [
        ({"sigma_min": 0.0}, True),
        ({"train_coefficients": "edm"}, True),
        ({}, False),  # sigma_min 0.002 with the consistency coefficients in training
    ],
)
def test_needs_trigflows_coefficients(kwargs, ok):
    sched = get_schedule("edm")
    param = ConsistencyParam(sched, **kwargs)
    if ok:
        assert SCMLoss(sched, param).boundary == 0
        return
    with pytest.raises(ConfigError, match="parameterization.sigma_min=0"):
        SCMLoss(sched, param)


def test_config_and_options():
    sched = get_schedule("edm")
    loss = instantiate(OmegaConf.load(f"{CONF_DIR}/loss/scm.yaml"))(
        schedule=sched, parameterization=EDMParam(sched)
    )
    assert isinstance(loss, SCMLoss) and loss.tangent == "data" and loss.p_mean == -1.0
    assert loss.warmup() == 0.0
    loss.set_step(5000)
    assert loss.warmup() == 0.5
    assert sum(p.numel() for p in loss.parameters()) == 129  # u: 128 features + bias
    for bad in ({"tangent": "ode"}, {"tangent_norm": "max"}, {"p_std": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SCMLoss(sched, EDMParam(sched), **bad)


@pytest.mark.parametrize(
    ("tangent", "mean_err", "max_err"), [("data", 0.025, 0.2), ("teacher", 0.012, 0.15)]
)
def test_training_converges_to_the_closed_form_map(tangent, mean_err, max_err):
    """sCT (tangent from the data) and sCD (from the exact Gaussian teacher) with the paper's
    defaults (RMS normalisation, prior and adaptive weighting; no warm-up) from scratch on 1-D
    N(0.3, 0.5^2), 1500 steps of batch 512, Adam 1e-2 with a cosine decay (about 4 CPU s): f over
    sigma in [0.01, 80] and x within 2.5 std of the marginal is mu + s (x - mu) /
    sqrt(s^2 + sigma^2) within the stated mean and max errors (measured: sCT 0.012 and 0.10,
    sCD 0.0055 and 0.080; the max is at sigma = 80, in the log-normal's far tail)."""
    torch.manual_seed(0)
    sched = get_schedule("edm")
    param = ConsistencyParam(sched, sigma_min=0.0)
    den = Denoiser(Net(), param)
    loss = SCMLoss(sched, param, tangent=tangent, warmup_steps=0)
    if tangent == "teacher":
        loss.set_teacher(gaussian_denoiser())
    err = fit_gaussian(den, loss)
    assert err.mean() < mean_err and err.max() < max_err
