"""DINOv2 read from local weights: shapes, the one message for a missing file, and optional
parity with facebookresearch/dinov2's own code (``DL_DINOV2_PATH`` = a checkout of it)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from diffusionlab.errors import ConfigError
from diffusionlab.networks.dinov2 import DINOv2, load_dinov2

DINOV2 = os.environ.get("DL_DINOV2_PATH")


def tiny(registers: int = 0, swiglu: bool = False) -> DINOv2:
    """A 2-block ViT-S-wide model with a 4x4 position table (56 px), random weights."""
    torch.manual_seed(0)
    model = DINOv2(384, 2, 6, 14, 56, registers, swiglu)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


@pytest.mark.parametrize("registers", [0, 4])
def test_file_round_trip_and_shapes(tmp_path, registers):
    model = tiny(registers)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(model.state_dict(), path)
    loaded = load_dinov2(path, "eval.dinov2_weights")
    assert loaded.registers == registers and len(loaded.blocks) == 2
    assert loaded.size_name == "dinov2-vit-s-14" + ("-reg" if registers else "")
    x = torch.randn(2, 3, 42, 70)  # 3 x 5 tokens: the table is resized
    cls, patches = loaded.features(x)
    assert cls.shape == (2, 384) and patches.shape == (2, 15, 384)
    torch.testing.assert_close(loaded(x), model(x))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_swiglu_width_is_the_hub_rounding():
    model = tiny(swiglu=True)
    # ViT-g's hidden width: (int(4 d * 2 / 3) + 7) // 8 * 8
    assert model.blocks[0].mlp.w3.in_features == (int(4 * 384 * 2 / 3) + 7) // 8 * 8


def test_missing_file_is_one_message_naming_key_and_file(tmp_path):
    path = tmp_path / "nowhere" / "dinov2_vitl14_pretrain.pth"
    with pytest.raises(ConfigError) as e:
        load_dinov2(path, "eval.dinov2_weights")
    msg = str(e.value)
    assert "eval.dinov2_weights" in msg and str(path) in msg and "\n" not in msg
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth" in msg
    with pytest.raises(ConfigError, match="repa.encoder.weights is not set"):
        load_dinov2(None, "repa.encoder.weights")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="is not a DINOv2 weights file"):
        load_dinov2(bad, "eval.dinov2_weights")


@pytest.mark.parity
@pytest.mark.skipif(not DINOV2, reason="set DL_DINOV2_PATH to a facebookresearch/dinov2 checkout")
@pytest.mark.parametrize("hub", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_parity_with_the_hub_code(tmp_path, hub):
    """The hub's own model (random weights) and ours from its state dict: equal outputs at 224 px
    (the table resized from 518 px) and at another size."""
    sys.path.insert(0, DINOV2)
    try:
        os.environ["XFORMERS_DISABLED"] = "1"
        ref = torch.hub.load(DINOV2, hub, source="local", pretrained=False).eval()
    finally:
        sys.path.remove(DINOV2)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path / f"{hub}_pretrain.pth"
    torch.save(ref.state_dict(), path)
    ours = load_dinov2(path, "eval.dinov2_weights")
    for size in (224, 98):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            want = ref.forward_features(x)
            cls, patches = ours.features(x)
        torch.testing.assert_close(cls, want["x_norm_clstoken"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(patches, want["x_norm_patchtokens"], atol=1e-5, rtol=1e-5)
