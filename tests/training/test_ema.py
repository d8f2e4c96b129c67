"""EMA: the decay schedules in closed form and the update rule."""

import copy

import pytest
import torch

from diffusionlab.errors import ConfigError
from diffusionlab.training.ema import HalfLifeEMA, PlainEMA, ema_update


def test_plain_ema_warmup_values():
    ema = PlainEMA(decay=0.999, warmup=True)
    assert ema.beta(0, 64) == pytest.approx(0.1)
    assert ema.beta(10, 64) == pytest.approx(11 / 20)
    assert ema.beta(100000, 64) == 0.999
    assert PlainEMA(0.9, warmup=False).beta(0, 64) == 0.9


def test_halflife_ema_matches_edm_formula():
    ema = HalfLifeEMA(halflife_kimg=500, warmup_ratio=0.05)
    # after 10 steps of 512 images: halflife = min(500k, 10*512*0.05) = 256 images
    assert ema.beta(10, 512) == pytest.approx(0.5 ** (512 / 256))
    # late in training the half-life is 500k images
    assert ema.beta(10**7, 512) == pytest.approx(0.5 ** (512 / 500_000))
    with pytest.raises(ConfigError, match="halflife_kimg"):
        HalfLifeEMA(halflife_kimg=0)


def test_ema_update_is_lerp_and_copies_buffers():
    model = torch.nn.BatchNorm1d(3)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.running_mean.fill_(5.0)
    ema_update(ema, model, beta=0.75)
    torch.testing.assert_close(ema.weight, torch.full((3,), 0.75 * 1.0 + 0.25 * 2.0))
    torch.testing.assert_close(ema.running_mean, torch.full((3,), 5.0))


def test_bad_decay_is_rejected():
    with pytest.raises(ConfigError, match="ema.decay"):
        PlainEMA(decay=1.0)
