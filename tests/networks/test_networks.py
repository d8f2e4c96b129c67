"""Network presets: reference parameter counts, shapes, conditioning, gradients, determinism."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusionlab.networks import MLP, DhariwalUNet, DiT, EDM2UNet, SongUNet

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
TINY = ["unet_tiny", "unet_ncsnpp_tiny", "unet_adm_tiny", "dit_tiny", "unet_edm2_tiny"]
MLPS = ["mlp", "mlp_tiny"]


def build(
    preset: str, res: int = 16, ch: int = 1, classes: int = 10, **overrides
) -> torch.nn.Module:
    """Instantiate ``conf/model/<preset>.yaml`` the way the app does, with a stand-in dataset."""
    cfg = OmegaConf.create(
        {
            "label_dim": classes,
            "dataset": {"resolution": res, "channels": ch, "num_classes": classes, "dim": 2},
        }
    )
    cfg.model = OmegaConf.merge(OmegaConf.load(CONF / f"{preset}.yaml"), overrides)
    return instantiate(cfg.model)


def inputs(net: torch.nn.Module, shape: tuple[int, ...], label_dim: int = 10, augment_dim: int = 0):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    c_noise = torch.randn(shape[0], generator=g)
    labels = torch.nn.functional.one_hot(torch.arange(shape[0]) % label_dim, label_dim).float()
    aug = torch.randn(shape[0], augment_dim, generator=g) if augment_dim else None
    return x, c_noise, labels, aug


@torch.no_grad()
def perturb(net: torch.nn.Module, scale: float = 0.1) -> None:
    """Move zero-initialised weights (adaLN-Zero, zero output convs, EDM2 gains) off zero."""
    g = torch.Generator().manual_seed(2)
    for p in net.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g))


def count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# Reference numbers: parameters of the reference class for the same configuration, counted from
# NVlabs/edm training/networks.py (SongUNet, DhariwalUNet), NVlabs/edm2 training/networks_edm2.py
# (Precond incl. log-variance head) and facebookresearch/DiT models.py (trainable parameters; the
# frozen sin-cos pos_embed parameter adds grid^2 * hidden, giving the paper's 33/130/458/675 M).
REFERENCE = [
    # EDM CIFAR-10 (Table 7): 32x32x3, augment_dim 9 as in EDM's runs; EDM reports 56 M.
    ("unet_ddpmpp", 32, 3, 0, {"augment_dim": 9}, 55_733_891),
    ("unet_ddpmpp", 32, 3, 10, {"augment_dim": 9}, 55_735_299),
    ("unet_ddpmpp", 32, 3, 0, {}, 55_732_739),
    ("unet_ncsnpp", 32, 3, 0, {"augment_dim": 9}, 56_397_827),
    ("unet_ncsnpp", 32, 3, 10, {"augment_dim": 9}, 56_400_643),
    # EDM ImageNet-64 ADM: EDM reports 296 M.
    ("unet_adm", 64, 3, 1000, {}, 295_899_267),
    # DiT on 32x32x4 latents, 1000 classes, learned sigma (out_channels 8).
    ("dit", 32, 4, 1000, {"size": "S", "out_channels": 8}, 32_963_360 - 256 * 384),
    ("dit", 32, 4, 1000, {"size": "B", "out_channels": 8}, 130_512_416 - 256 * 768),
    ("dit", 32, 4, 1000, {"size": "L", "out_channels": 8}, 458_102_816 - 256 * 1024),
    ("dit", 32, 4, 1000, {"size": "XL", "out_channels": 8}, 675_129_632 - 256 * 1152),
    # EDM2 ImageNet-512 latents 64x64x4 (XS 125 M, S 280 M in EDM2 Table 2) and ImageNet-64 S.
    ("unet_edm2_xs", 64, 4, 1000, {"logvar_channels": 128}, 124_713_253),
    ("unet_edm2", 64, 4, 1000, {"logvar_channels": 128}, 280_212_837),
    ("unet_edm2", 64, 3, 1000, {"logvar_channels": 128}, 280_209_381),
]


@pytest.mark.parametrize(("preset", "res", "ch", "classes", "overrides", "expected"), REFERENCE)
def test_full_preset_parameter_count_equals_reference(
    preset, res, ch, classes, overrides, expected
):
    with torch.device("meta"):
        net = build(preset, res, ch, classes, **overrides)
    assert count(net) == expected


@pytest.mark.parametrize(
    ("preset", "res", "ch", "classes"),
    [
        ("unet_ddpmpp", 32, 3, 10),
        ("unet_ncsnpp", 32, 3, 10),
        ("unet_adm", 64, 3, 1000),
        ("dit", 32, 4, 1000),
        ("unet_edm2", 64, 4, 1000),
        ("unet_edm2_xs", 64, 4, 1000),
    ],
)
def test_full_preset_forward_shape_on_meta(preset, res, ch, classes):
    with torch.device("meta"):
        net = build(preset, res, ch, classes).eval()
        x, c_noise, labels, _ = inputs(net, (2, ch, res, res), classes)
        out = net(x.to("meta"), c_noise.to("meta"), labels.to("meta"))
    assert out.shape == (2, ch, res, res) and out.dtype == torch.float32


@pytest.mark.parametrize("preset", TINY)
def test_tiny_output_shape_dtype_and_no_labels(preset):
    net = build(preset).eval()
    x, c_noise, labels, _ = inputs(net, (3, 1, 16, 16))
    with torch.no_grad():
        out = net(x, c_noise, labels)
        zeros = net(x, c_noise, torch.zeros_like(labels))
        none = net(x, c_noise)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(none, zeros)  # all-zero one-hot == unconditional


@pytest.mark.parametrize("preset", MLPS)
def test_mlp_output_shape(preset):
    net = build(preset)
    out = net(torch.randn(5, 2), torch.randn(5))
    assert out.shape == (5, 2) and out.dtype == torch.float32


def test_mlp_preset_parameters():
    net = build("mlp")
    assert isinstance(net, MLP) and count(net) == 825_346


@pytest.mark.parametrize("preset", [*TINY, "mlp_tiny"])
def test_conditioning_paths_change_output(preset):
    net = build(
        preset, augment_dim=3, **({"in_dim": 2, "label_dim": 10} if "mlp" in preset else {})
    )
    perturb(net)
    net.eval()
    shape = (2, 2) if "mlp" in preset else (2, 1, 16, 16)
    x, c_noise, labels, aug = inputs(net, shape, augment_dim=3)
    with torch.no_grad():
        base = net(x, c_noise, labels, aug)
        changed = {
            "noise": net(x, c_noise + 1.0, labels, aug),
            "label": net(x, c_noise, labels.roll(1, dims=1), aug),
            "augment": net(x, c_noise, labels, aug + 1.0),
        }
    for name, out in changed.items():
        assert (out - base).abs().max() > 1e-4, f"{name} conditioning has no effect"


@pytest.mark.parametrize("preset", [*TINY, "mlp_tiny"])
def test_label_dropout_one_equals_unconditional(preset):
    extra = {"in_dim": 2, "label_dim": 10} if "mlp" in preset else {}
    net = build(preset, label_dropout=1.0, **extra)
    perturb(net)
    shape = (2, 2) if "mlp" in preset else (2, 1, 16, 16)
    x, c_noise, labels, _ = inputs(net, shape)
    dropped = net.train()(x, c_noise, labels)
    uncond = net.train()(x, c_noise, torch.zeros_like(labels))
    kept = net.eval()(x, c_noise, labels)
    torch.testing.assert_close(dropped, uncond)
    assert (kept - dropped).abs().max() > 1e-4


@pytest.mark.parametrize("preset", [*TINY, "mlp_tiny"])
def test_gradients_reach_every_parameter(preset):
    extra = {"in_dim": 2, "label_dim": 10} if "mlp" in preset else {}
    if "edm2" in preset:
        extra["logvar_channels"] = 128  # the in-network log-variance head must train too
    net = build(preset, augment_dim=3, **extra)
    perturb(net)
    shape = (2, 2) if "mlp" in preset else (2, 1, 16, 16)
    x, c_noise, labels, aug = inputs(net, shape, augment_dim=3)
    if isinstance(net, EDM2UNet):
        out, logvar = net(x, c_noise, labels, aug, return_logvar=True)
        (out.square().mean() + logvar.square().mean()).backward()
    else:
        net(x, c_noise, labels, aug).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("preset", [*TINY, "mlp"])
def test_same_seed_same_weights(preset):
    states = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        states.append(build(preset).state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (SongUNet, dict(model_channels=16, channel_mult=[1, 2, 2])),
        (DhariwalUNet, dict(model_channels=16, channel_mult=[1, 2, 2])),
        (EDM2UNet, dict(model_channels=16, channel_mult=[1, 2, 2])),
        (DiT, dict(patch_size=4, depth=1, hidden_size=32, num_heads=2)),
    ],
)
def test_impossible_resolution_is_one_clear_error(cls, kwargs):
    with pytest.raises(ValueError, match="img_resolution=18"):
        cls(img_resolution=18, in_channels=1, out_channels=1, **kwargs)


@pytest.mark.parametrize("preset", ["unet_tiny", "unet_adm_tiny", "unet_edm2_tiny", "dit_tiny"])
def test_non_power_of_two_resolution(preset):
    net = build(preset, res=12).eval()
    x, c_noise, labels, _ = inputs(net, (2, 1, 12, 12))
    with torch.no_grad():
        assert net(x, c_noise, labels).shape == x.shape


@pytest.mark.parametrize("preset", TINY)
def test_bf16_autocast_and_channels_last(preset):
    net = build(preset)
    perturb(net, 0.02)
    net.eval()
    x, c_noise, labels, _ = inputs(net, (2, 1, 16, 16))
    with torch.no_grad():
        ref = net(x, c_noise, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x, c_noise, labels)
        cl = net.to(memory_format=torch.channels_last)(
            x.to(memory_format=torch.channels_last), c_noise, labels
        )
    assert torch.isfinite(low).all()
    assert (low.float() - ref).norm() / ref.norm() < 0.1
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)


def test_edm2_logvar_head():
    net = build("unet_edm2_tiny", logvar_channels=128).eval()
    x, c_noise, labels, _ = inputs(net, (3, 1, 16, 16))
    out, logvar = net(x, c_noise, labels, return_logvar=True)
    assert out.shape == x.shape and logvar.shape == (3, 1, 1, 1)
    assert logvar.unique().numel() == 3  # u(sigma) depends on the noise level
    no_head = build("unet_edm2_tiny", logvar_channels=0)
    with pytest.raises(ValueError, match="logvar_channels"):
        no_head(x, c_noise, labels, return_logvar=True)


def test_edm2_forced_weight_normalisation():
    net = build("unet_edm2_tiny").train()
    x, c_noise, labels, _ = inputs(net, (2, 1, 16, 16))
    net(x, c_noise, labels)
    w = net.enc["16x16_conv"].weight
    norms = w.flatten(1).norm(dim=1) / w[0].numel() ** 0.5
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-3, rtol=0)


@pytest.mark.slow
def test_torch_compile_unet_tiny():
    net = build("unet_tiny").eval()
    x, c_noise, labels, _ = inputs(net, (2, 1, 16, 16))
    compiled = torch.compile(net)
    start = time.perf_counter()
    with torch.no_grad():
        out = compiled(x, c_noise, labels)
        torch.testing.assert_close(out, net(x, c_noise, labels), rtol=1e-4, atol=1e-4)
    print(f"compile + first call: {time.perf_counter() - start:.1f} s")


_SONG = dict(
    model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8], dropout=0
)
_SMALL = dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
_NCSNPP = dict(
    embedding_type="fourier",
    channel_mult_noise=2,
    encoder_type="residual",
    resample_filter=[1, 3, 3, 1],
)
# Outputs of the reference classes (NVlabs/edm SongUNet and DhariwalUNet, NVlabs/edm2 UNet and
# Precond's log-variance head, facebookresearch/DiT DiT) after loading the weights of our network
# built below (seed 0, then `perturb`), on the inputs below: every 97th output value, and the mean
# absolute output. Loading is name-for-name except DiT, whose module names differ.
PARITY = [
    (
        lambda: SongUNet(16, 3, 3, label_dim=10, **_SONG),
        [0.34198, -0.4128, -0.08969, -0.9555, -0.46291, -0.78625],
        0.750449,
    ),
    (
        lambda: SongUNet(16, 3, 3, label_dim=10, **_NCSNPP, **_SONG),
        [0.4973, -0.68402, -0.25308, -0.06145, -0.46722, -0.8279],
        0.472845,
    ),
    (
        lambda: DhariwalUNet(16, 3, 3, label_dim=10, dropout=0, **_SMALL),
        [-0.1213, 0.15044, -0.8989, -0.08185, 0.20588, -1.35491],
        0.548819,
    ),
    (
        lambda: EDM2UNet(16, 3, 3, label_dim=10, **_SMALL),
        [-0.02925, 0.0199, 0.00714, 0.03061, 0.02495, -0.0151],
        0.031062,
    ),
    (
        lambda: DiT(16, 3, 6, label_dim=10, size="S", depth=2, hidden_size=64, num_heads=4),
        [0.75644, 0.25486, 1.43743, -1.5858, -0.26972, -1.71641],
        0.791987,
    ),
]


@pytest.mark.parametrize(("make", "values", "mean_abs"), PARITY)
def test_parity_with_reference_implementation(make, values, mean_abs):
    torch.manual_seed(0)
    net = make().eval()
    perturb(net)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=g)
    c_noise = torch.randn(2, generator=g)
    labels = torch.zeros(2, 10)
    labels[0, 3] = 1  # sample 1 unconditional (DiT: its null class)
    with torch.no_grad():
        out = net(x, c_noise, labels)
        if isinstance(net, EDM2UNet):
            logvar = net(x, c_noise, labels, return_logvar=True)[1].flatten()
            torch.testing.assert_close(logvar, torch.tensor([0.11515, 1.38326]), rtol=0, atol=2e-5)
    torch.testing.assert_close(out.flatten()[::97][:6], torch.tensor(values), rtol=1e-4, atol=2e-5)
    assert out.abs().mean().item() == pytest.approx(mean_abs, rel=1e-4)
