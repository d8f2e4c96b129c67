"""Activation checkpointing (``checkpointing=true``): same output and gradients, blocks re-run."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from test_networks import CONF, build, inputs, perturb

# tiny presets of the four network classes; dropout on where the class has it, so the test also
# proves that the recomputation replays the dropout masks
CASES = [
    ("unet_tiny", {"dropout": 0.2}),
    ("unet_adm_tiny", {"dropout": 0.2}),
    ("unet_edm2_tiny", {"dropout": 0.2}),
    ("dit_tiny", {}),
]
LARGE = ["unet_ddpmpp", "unet_ncsnpp", "unet_adm", "unet_edm2", "unet_edm2_xs", "dit"]


BLOCKS = {"UNetBlock", "Block", "DiTBlock"}


def count_calls(block: torch.nn.Module) -> list:
    """Record each run of ``block.forward`` (forward hooks do not fire on recomputation)."""
    calls, forward = [], block.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    block.forward = counted
    return calls


def _grads(preset: str, overrides: dict, checkpointing: bool) -> tuple[torch.Tensor, list, int]:
    torch.manual_seed(0)
    net = build(preset, checkpointing=checkpointing, **overrides).train()
    perturb(net)
    calls = count_calls(next(m for m in net.modules() if type(m).__name__ in BLOCKS))
    x, c_noise, labels, _ = inputs(net, (3, 1, 16, 16))
    torch.manual_seed(1)
    out = net(x, c_noise, labels)
    (out.square().mean()).backward()
    return out.detach(), [p.grad.clone() for p in net.parameters()], len(calls)


@pytest.mark.parametrize(("preset", "overrides"), CASES)
def test_checkpointing_gives_identical_gradients(preset, overrides):
    out, grads, calls = _grads(preset, overrides, checkpointing=False)
    out_ck, grads_ck, calls_ck = _grads(preset, overrides, checkpointing=True)
    assert (calls, calls_ck) == (1, 2)  # the checkpointed block ran again in backward
    torch.testing.assert_close(out_ck, out, rtol=0, atol=0)
    for g_ck, g in zip(grads_ck, grads, strict=True):
        torch.testing.assert_close(g_ck, g, rtol=1e-6, atol=1e-7)


def test_checkpointing_is_off_in_eval_and_no_grad():
    net = build("unet_tiny", checkpointing=True).eval()
    calls = count_calls(net.enc["16x16_block0"])
    x, c_noise, labels, _ = inputs(net, (2, 1, 16, 16))
    with torch.no_grad():
        net(x, c_noise, labels)
    assert calls == [1]


@pytest.mark.parametrize("preset", LARGE)
def test_large_presets_expose_checkpointing_off_by_default(preset):
    assert OmegaConf.load(CONF / f"{preset}.yaml").checkpointing is False
