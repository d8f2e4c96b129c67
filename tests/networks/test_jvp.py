"""Forward-mode AD through the network zoo (sCM's tangent, diffusion/continuous_consistency.py):
the JVP of the preconditioned denoiser along (dx/dsigma, 1) equals its central finite difference
in training mode, dropout masks included (each sample's masks come from its stream, so the
primal and tangent passes see the same ones)."""

from __future__ import annotations

import pytest
import torch
from test_networks import build, inputs, perturb

from diffusionlab.diffusion.batched_rng import BatchedGenerator, use_generator
from diffusionlab.diffusion.continuous_consistency import total_derivative
from diffusionlab.diffusion.parameterizations import ConsistencyParam, Denoiser
from diffusionlab.diffusion.schedules import get_schedule
from diffusionlab.diffusion.seeds import sample_seed
from diffusionlab.networks.layers import number_dropout_layers

PRESETS = ["unet_tiny", "unet_ncsnpp_tiny", "unet_adm_tiny", "unet_edm2_tiny", "dit_tiny"]


@pytest.mark.parametrize("preset", PRESETS)
def test_total_derivative_equals_finite_difference(preset):
    torch.manual_seed(0)
    overrides = {} if preset == "dit_tiny" else {"dropout": 0.2}
    net = build(preset, **overrides).train()
    perturb(net, 0.05)
    number_dropout_layers(net)
    den = Denoiser(net, ConsistencyParam(get_schedule("edm"), sigma_min=0.0)).train()
    x, _, labels, _ = inputs(net, (3, 1, 16, 16))
    sigma = torch.tensor([0.05, 0.7, 9.0])
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    keys = [sample_seed(1, i) for i in range(3)]

    def f(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        with use_generator(BatchedGenerator(keys)):
            return den(y, s, class_labels=labels)

    _, df = total_derivative(f, x, sigma, v)
    h = 1e-3 * sigma  # float32: truncation (NCSN++'s Fourier time, scale 16) vs rounding
    col = h.view(-1, 1, 1, 1)
    with torch.no_grad():
        fd = (f(x + col * v, sigma + h) - f(x - col * v, sigma - h)) / (2 * col)
    err = (df - fd).flatten(1).norm(dim=1) / fd.flatten(1).norm(dim=1)
    assert err.max() < 5e-3, err
