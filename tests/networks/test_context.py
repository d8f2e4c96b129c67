"""Text and image condition inputs through every image network (networks/context.py): shapes,
each input acting, masked tokens and None inputs meaning what the docs say, gradients."""

from __future__ import annotations

import pytest
import torch
from test_networks import TINY, build, perturb

from diffusionlab.networks.context import CrossAttention2d, cross_attention_names

CTX, VEC = 12, 5


def cond_net(preset: str, **kw) -> torch.nn.Module:
    net = build(
        preset,
        classes=0,
        context_dim=CTX,
        vector_dim=VEC,
        cond_channels=1,
        cross_attn_resolutions=[8],
        **kw,
    )
    perturb(net)
    return net.eval()


def cond_inputs(b: int = 2, tokens: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(b, tokens, dtype=torch.bool)
    mask[0, 4:] = False  # a shorter caption
    return {
        "context": torch.randn(b, tokens, CTX, generator=g),
        "context_mask": mask,
        "cond_vector": torch.randn(b, VEC, generator=g),
        "cond_image": torch.randn(b, 1, 8, 8, generator=g),  # half size: resized to the input
    }


def xc(b: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.randn(b, 1, 16, 16, generator=g), torch.randn(b, generator=g)


@pytest.mark.parametrize("preset", TINY)
@torch.no_grad()
def test_every_condition_input_acts_and_keeps_the_shape(preset):
    net = cond_net(preset)
    x, c = xc()
    inputs = cond_inputs()
    base = net(x, c, **inputs)
    assert base.shape == x.shape and base.dtype == x.dtype
    for name in inputs:
        changed = dict(inputs)
        v = inputs[name]
        changed[name] = ~v if v.dtype == torch.bool else v + 1.0
        if name == "context_mask":
            changed[name][:, 0] = True  # keep one token per caption
        out = net(x, c, **changed)
        assert (out - base).abs().max() > 1e-4, f"{preset}: {name} has no effect"


@pytest.mark.parametrize("preset", TINY)
@torch.no_grad()
def test_masked_tokens_are_ignored_and_none_is_the_null_input(preset):
    net = cond_net(preset)
    x, c = xc()
    inputs = cond_inputs()
    base = net(x, c, **inputs)
    junk = dict(inputs, context=inputs["context"].clone())
    junk["context"][0, 4:] = 1e3  # padded positions of the short caption
    torch.testing.assert_close(net(x, c, **junk), base)
    # None = the dropped condition: an all-masked context, a zero vector, a zero image
    nulls = {
        "context_mask": torch.zeros_like(inputs["context_mask"]),
        "cond_vector": torch.zeros_like(inputs["cond_vector"]),
        "cond_image": torch.zeros_like(inputs["cond_image"]),
    }
    dropped = net(x, c, context=inputs["context"], **nulls)
    torch.testing.assert_close(net(x, c), dropped, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", TINY)
def test_gradients_reach_the_condition_layers(preset):
    net = cond_net(preset).train()
    x, c = xc()
    inputs = cond_inputs()
    inputs["context"].requires_grad_(True)
    net(x, c, **inputs).square().mean().backward()
    assert inputs["context"].grad.abs().sum() > 0
    names = [n for n, _ in net.named_parameters() if "xattn" in n or "vector" in n]
    assert names, "no condition layers"
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("preset", ["unet_tiny", "unet_adm_tiny", "unet_edm2_tiny"])
def test_cross_attention_only_at_the_chosen_resolutions(preset):
    net = build(preset, classes=0, context_dim=CTX, cross_attn_resolutions=[4])
    names = list(net.xattn)
    assert names and all(n.split("_", 1)[1].startswith("4x4") for n in names)
    assert any(n.startswith("enc_") for n in names) and any(n.startswith("dec_") for n in names)
    with pytest.raises(Exception, match=r"cross_attn_resolutions=\[32\] match no level"):
        build(preset, classes=0, context_dim=CTX, cross_attn_resolutions=[32])


def test_unconditional_networks_have_no_condition_layers():
    for preset in TINY:
        net = build(preset, classes=0)
        assert not any("xattn" in n or "vector" in n for n, _ in net.named_parameters())
    assert cross_attention_names(["16x16_block0"], [], [16], 0, "net") == []


def test_cross_attention_is_softmax_attention_over_the_null_token_and_kept_tokens():
    """Closed form for one head: out = x + proj(softmax(q k^T / sqrt(d)) v) with k, v of the
    null token and the unmasked tokens only."""
    torch.manual_seed(0)
    layer = CrossAttention2d(4, 3, num_heads=1, init_zero={"init_weight": 1.0})
    layer.null.data.normal_()
    x = torch.randn(1, 4, 2, 2)
    ctx = torch.randn(1, 3, 3)
    mask = torch.tensor([[True, False, True]])
    out = layer(x, ctx, mask)
    kept = torch.cat([layer.null[None], ctx[0, [0, 2]]])
    q = layer.q(layer.norm(x)).reshape(4, 4).T  # pixels x channels
    k, v = layer.kv(kept).chunk(2, dim=-1)
    a = torch.softmax(q @ k.T / 2.0, dim=-1) @ v  # d = 4 channels
    ref = x + layer.proj(a.T.reshape(1, 4, 2, 2))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
