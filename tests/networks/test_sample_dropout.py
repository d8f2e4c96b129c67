"""Dropout and label dropout inside a training step draw each sample's masks from its own
streams of the batched generator: a sample's output does not depend on its batch, the masks of
two layers differ, activation checkpointing replays them, and outside a step the process RNG
drives them as before."""

from __future__ import annotations

import pytest
import torch
from test_networks import build, inputs, perturb

from diffusionlab.diffusion.batched_rng import BatchedGenerator, use_generator
from diffusionlab.diffusion.seeds import sample_seed
from diffusionlab.networks.layers import Dropout, condition_labels, number_dropout_layers

PRESETS = [
    ("unet_tiny", {"dropout": 0.3, "label_dropout": 0.5}),
    ("unet_adm_tiny", {"dropout": 0.3, "label_dropout": 0.5}),
    ("unet_edm2_tiny", {"dropout": 0.3, "label_dropout": 0.5}),
    ("mlp_tiny", {"dropout": 0.3, "label_dropout": 0.5}),
]
KEYS = [sample_seed(3, p) for p in range(6)]


def _net(preset: str, overrides: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build(preset, **overrides).train()
    perturb(net)
    assert number_dropout_layers(net) > 0
    return net


@pytest.mark.parametrize(("preset", "overrides"), PRESETS)
def test_a_sample_gets_the_same_masks_in_any_batch(preset, overrides):
    net = _net(preset, overrides)
    shape = (6, 2) if "mlp" in preset else (6, 1, 16, 16)
    x, c_noise, labels, _ = inputs(net, shape)
    with torch.no_grad(), use_generator(BatchedGenerator(KEYS)):
        full = net(x, c_noise, labels)
    with torch.no_grad(), use_generator(BatchedGenerator(KEYS[2:4])):
        part = net(x[2:4], c_noise[2:4], labels[2:4])
    torch.testing.assert_close(part, full[2:4], rtol=0, atol=1e-5 * full.abs().max())
    # with the process RNG, the same call draws other masks
    torch.manual_seed(5)
    with torch.no_grad():
        other = net(x[2:4], c_noise[2:4], labels[2:4])
    assert (other - full[2:4]).abs().max() > 1e-3 * full.abs().max()


def test_layers_get_distinct_streams_and_masks():
    net = torch.nn.Sequential(Dropout(0.5), Dropout(0.5))
    assert number_dropout_layers(net) == 2 and [m.stream for m in net] == [0, 1]
    x = torch.ones(4, 64)
    with use_generator(BatchedGenerator(KEYS[:4])):
        a, b = net[0](x), net[1](x)
    assert not torch.equal(a, b)
    assert set(a.unique().tolist()) == {0.0, 2.0}


def test_label_dropout_coin_is_per_sample():
    labels = torch.eye(6)
    x = torch.zeros(6, 1)
    with use_generator(BatchedGenerator(KEYS)):
        full = condition_labels(labels, x, 6, 0.5, training=True)
    with use_generator(BatchedGenerator(KEYS[3:])):
        part = condition_labels(labels[3:], x[3:], 6, 0.5, training=True)
    assert torch.equal(part, full[3:])
    assert 0 < full.sum() < 6  # some dropped, some kept
    assert torch.equal(condition_labels(labels, x, 6, 0.5, training=False), labels)


@pytest.mark.parametrize("preset", ["unet_tiny", "unet_edm2_tiny"])
def test_checkpointing_replays_the_generator_masks(preset):
    """The forward runs inside the step's generator block and backward after it (as Lightning
    does): the recomputed blocks must draw the same masks, so gradients match."""

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        net = _net(preset, {"dropout": 0.3, "checkpointing": checkpointing})
        x, c_noise, labels, _ = inputs(net, (3, 1, 16, 16))
        with use_generator(BatchedGenerator(KEYS[:3])):
            out = net(x, c_noise, labels)
        torch.manual_seed(9)  # the process RNG moved: it must not matter
        out.square().mean().backward()
        return [p.grad.clone() for p in net.parameters()]

    for g_ck, g in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(g_ck, g, rtol=1e-6, atol=1e-7)
