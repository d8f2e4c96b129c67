"""Parameterizations: coefficients, c_noise choices, prediction conversions, the Denoiser."""

import math

import pytest
import torch
from torch import nn

from diffusionlab.diffusion.parameterizations import (
    PARAMETERIZATIONS,
    PREDICTIONS,
    Denoiser,
    EDMParam,
    convert,
    from_x0,
    get_parameterization,
    to_x0,
)
from diffusionlab.diffusion.schedules import get_schedule

SIGMAS = torch.tensor([0.002, 0.1, 1.0, 7.0, 80.0], dtype=torch.float64)


def oracle_prediction(name, x0, eps, sigma):
    """F's training target for each parameterization, from first principles."""
    if name == "eps":
        return eps
    if name == "x0":
        return x0
    if name == "v":  # Salimans & Ho: z = alpha x0 + sigma_vp eps, v = alpha eps - sigma_vp x0
        alpha, sigma_vp = 1 / math.sqrt(1 + sigma**2), sigma / math.sqrt(1 + sigma**2)
        return alpha * eps - sigma_vp * x0
    if name == "flow":  # x_t = (1 - t) x0 + t eps, v = eps - x0
        return eps - x0
    sd = 0.5  # EDM: F target = (x0 - c_skip x~) / c_out
    c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / math.sqrt(sigma**2 + sd**2)
    return (x0 - c_skip * (x0 + sigma * eps)) / c_out


@pytest.mark.parametrize("name", list(PARAMETERIZATIONS))
@pytest.mark.parametrize("sigma", SIGMAS.tolist())
def test_oracle_prediction_recovers_x0(name, sigma):
    """D(x~) = c_skip x~ + c_out F* is exactly x0 when F outputs its own target."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g)
    eps = eps.double()
    p = get_parameterization(name, get_schedule("edm"))
    c_skip, c_out, c_in, _ = p.coefficients(torch.tensor(sigma, dtype=torch.float64))
    d = c_skip * (x0 + sigma * eps) + c_out * oracle_prediction(name, x0, eps, sigma)
    torch.testing.assert_close(d, x0)
    assert c_in > 0


def test_vp_and_flow_inputs_are_the_scaled_x():
    """The network sees c_in x~ = s x~ = x for VP (eps, x0, v) and flow."""
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    vp, flow = get_schedule("vp"), get_schedule("flow")
    for name in ("eps", "x0", "v"):
        c_in = get_parameterization(name, vp).coefficients(vp.sigma(t))[2]
        torch.testing.assert_close(c_in, vp.scale(t))
    c_in = get_parameterization("flow", flow).coefficients(flow.sigma(t))[2]
    torch.testing.assert_close(c_in, flow.scale(t))


def test_edm_lambda_times_c_out_squared_is_one():
    p = EDMParam(get_schedule("edm"), sigma_data=0.5)
    _, c_out, _, c_noise = p.coefficients(SIGMAS)
    lam = (SIGMAS**2 + 0.25) / (SIGMAS * 0.5) ** 2  # EDM eq. 8 / Table 1
    torch.testing.assert_close(lam * c_out**2, torch.ones_like(SIGMAS))
    torch.testing.assert_close(p.loss_weight(SIGMAS), lam)
    torch.testing.assert_close(c_noise, SIGMAS.log() / 4)


def test_edm_precond_constants():
    sd = 0.7
    p = EDMParam(get_schedule("edm"), sigma_data=sd)
    c_skip, c_out, c_in, _ = p.coefficients(SIGMAS)
    torch.testing.assert_close(c_skip, sd**2 / (SIGMAS**2 + sd**2))
    torch.testing.assert_close(c_out, SIGMAS * sd / (SIGMAS**2 + sd**2).sqrt())
    torch.testing.assert_close(c_in, 1 / (SIGMAS**2 + sd**2).sqrt())


def test_c_noise_choices():
    vp, ddpm, flow, edm = (get_schedule(n) for n in ("vp", "ddpm", "flow", "edm"))
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    # EDM's VPPrecond: c_noise = (M - 1) sigma^-1(sigma) with M = 1000
    torch.testing.assert_close(
        get_parameterization("eps", vp).coefficients(vp.sigma(t))[3], 999 * t
    )
    flow_c = get_parameterization("flow", flow).coefficients(flow.sigma(t))[3]
    torch.testing.assert_close(flow_c, 1000 * t)
    # DDPM nets are conditioned on the integer step 0..999
    c = get_parameterization("eps", ddpm).coefficients(ddpm.grid[[0, 17, 999]].double())[3]
    assert c.tolist() == [0.0, 17.0, 999.0]
    assert get_parameterization("v", edm).c_noise_kind == "log"
    assert get_parameterization("edm", ddpm).c_noise_kind == "log"
    p = get_parameterization("edm", ddpm, c_noise="index")
    assert p.coefficients(ddpm.grid[[5]].double())[3].item() == 5.0
    p = get_parameterization("x0", vp, c_noise="t", t_scale=1.0)
    torch.testing.assert_close(p.coefficients(vp.sigma(t))[3], t)


@pytest.mark.parametrize("source", PREDICTIONS)
@pytest.mark.parametrize("target", PREDICTIONS)
def test_prediction_round_trips(source, target):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, 3, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.3, 1.0, 5.0, 50.0], dtype=torch.float64).view(5, 1, 1)
    pred = torch.randn(5, 2, 3, generator=g, dtype=torch.float64)
    there = convert(pred, source, target, x, sigma)
    torch.testing.assert_close(convert(there, target, source, x, sigma), pred)


def test_conversions_agree_with_definitions():
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    sigma = torch.tensor([[0.5], [3.0]])
    x = x0 + sigma * eps
    alpha, sigma_vp = 1 / (1 + sigma**2).sqrt(), sigma / (1 + sigma**2).sqrt()
    expected = {
        "x0": x0,
        "eps": eps,
        "score": -eps / sigma,  # grad log N(x; x0, sigma^2)
        "v": alpha * eps - sigma_vp * x0,
        "velocity": eps - x0,
    }
    for kind, value in expected.items():
        torch.testing.assert_close(from_x0(kind, x0, x, sigma), value)
        torch.testing.assert_close(to_x0(kind, value, x, sigma), x0)


class RecordingNet(nn.Module):
    """F = a * x + c_noise; records its inputs."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.3, dtype=dtype))

    def forward(self, x, c_noise, class_labels=None, augment_labels=None):
        self.seen = (x, c_noise, class_labels, augment_labels)
        return self.a * x + c_noise.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)


@pytest.mark.parametrize("name", list(PARAMETERIZATIONS))
def test_denoiser_formula_and_sigma_shapes(name):
    net = RecordingNet()
    p = get_parameterization(name, get_schedule("edm"))
    den = Denoiser(net, p)
    assert den.net is net and den.parameterization is p and den.schedule is p.schedule
    x = torch.randn(3, 2, 4, 4)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    labels, aug = torch.eye(3), torch.zeros(3, 9)
    d = den(x, sigma, class_labels=labels, augment_labels=aug)
    c_skip, c_out, c_in, c_noise = (c.view(3, 1, 1, 1) for c in p.coefficients(sigma))
    expected = c_skip * x + c_out * (0.3 * c_in * x + c_noise)
    torch.testing.assert_close(d, expected)
    assert net.seen[2] is labels and net.seen[3] is aug
    torch.testing.assert_close(den(x, sigma.view(3, 1, 1, 1)), d)
    d_scalar = den(x, 1.0)
    torch.testing.assert_close(d_scalar[1], d[1])
    torch.testing.assert_close(den(x, torch.tensor(1.0)), d_scalar)


def test_denoiser_runs_net_in_its_dtype_and_casts_back():
    net = RecordingNet(torch.bfloat16)
    den = Denoiser(net, get_parameterization("edm", get_schedule("edm")))
    x = torch.randn(2, 3)
    d = den(x, torch.tensor([0.5, 2.0]))
    assert net.seen[0].dtype == torch.bfloat16 and d.dtype == torch.float32
    assert den(x.bfloat16(), 0.5).dtype == torch.bfloat16


def test_denoiser_keeps_float64_precision():
    net = RecordingNet(torch.float64)
    p = get_parameterization("v", get_schedule("vp"))
    x = torch.randn(4, 3, dtype=torch.float64)
    sigma = torch.tensor([1e-3, 0.5, 3.0, 150.0], dtype=torch.float64)
    d = Denoiser(net, p)(x, sigma)
    c_skip, c_out, c_in, c_noise = (c.view(4, 1) for c in p.coefficients(sigma))
    assert d.dtype == torch.float64 and net.seen[1].dtype == torch.float32
    expected = c_skip * x + c_out * (0.3 * c_in * x + c_noise.float().double())
    torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-12)


def test_denoiser_bad_sigma_shape():
    den = Denoiser(RecordingNet(), get_parameterization("eps", get_schedule("vp")))
    with pytest.raises(ValueError, match="sigma="):
        den(torch.randn(4, 2), torch.ones(3))


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda s: get_parameterization("nope", s), "parameterization='nope'"),
        (lambda s: get_parameterization("edm", s, sigma_data=0.0), "sigma_data=0.0"),
        (lambda s: get_parameterization("eps", s, c_noise="ln"), "c_noise='ln'"),
        (lambda s: get_parameterization("eps", s, c_noise="index"), "c_noise='index'"),
        (lambda s: get_parameterization("eps", s, t_scale=-2.0), "t_scale=-2.0"),
        (lambda s: get_parameterization("eps", s).coefficients(torch.tensor([-1.0])), "sigma=-1.0"),
        (lambda s: to_x0("noise", torch.zeros(1), torch.zeros(1), 1.0), "prediction='noise'"),
    ],
)
def test_bad_values_raise_value_error(build, key):
    with pytest.raises(ValueError, match=key) as info:
        build(get_schedule("edm"))
    if "nope" in key:
        assert "flow" in str(info.value) and "eps" in str(info.value)
