"""EDM's augmentation pipeline: closed-form transforms, label layout, per-sample determinism,
zero labels = no augmentation in every network."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import diffusionlab.data.augment as augment
from diffusionlab.data.augment import (
    AugmentPipe,
    check_augment,
    rotate2d,
    scale2d,
    translate2d,
    warp,
)
from diffusionlab.diffusion.batched_rng import BatchedGenerator
from diffusionlab.errors import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf"
EDM = {"xflip": 1e8, "yflip": 1, "scale": 1, "rotate_frac": 1, "aniso": 1, "translate_frac": 1}
# label columns of EDM's settings, in layout order
COLUMNS = {
    "xflip": [0],
    "yflip": [1],
    "scale": [2],
    "rotate_frac": [3, 4],
    "aniso": [5, 6],
    "translate_frac": [7, 8],
}


def gen(seeds) -> BatchedGenerator:
    return BatchedGenerator.from_seeds(list(seeds))


def images(n: int = 32, c: int = 1, h: int = 8, w: int = 8) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(0))


def centred_grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(
        torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij"
    )
    return xs.double(), ys.double()


def smooth(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A smooth non-symmetric test image f(x, y) (low frequencies: the warp resamples it well)."""
    return torch.cos(0.175 * x + 0.1 * y) + 0.5 * torch.sin(0.125 * y - 0.05 * x)


def test_p_zero_is_the_exact_input_and_zero_labels():
    x = images()
    out, labels = AugmentPipe(p=0, **EDM)(x, gen(range(32)))
    assert torch.equal(out, x)
    assert labels.shape == (32, 9) and not labels.any()


def test_edm_settings_give_9_labels_and_each_transform_its_columns():
    """The label layout: the full pipeline's columns are exactly the labels of each transform
    alone (each transform has its own random slots, so enabling others changes nothing)."""
    x = images()
    full = AugmentPipe(p=1, **EDM)
    assert full.label_dim == 9
    _, labels = full(x, gen(range(32)))
    for name, cols in COLUMNS.items():
        alone = AugmentPipe(p=1, **{name: EDM[name]})
        assert alone.label_dim == len(cols)
        _, own = alone(x, gen(range(32)))
        assert torch.equal(labels[:, cols], own), name
    assert set(labels[:, :2].unique().tolist()) == {0.0, 1.0}  # flips are 0/1
    cos_m1, sin = labels[:, 3], labels[:, 4]
    torch.testing.assert_close((cos_m1 + 1) ** 2 + sin**2, torch.ones(32))
    assert AugmentPipe(p=1, rotate_int=1, translate_int=1).label_dim == 4


@pytest.mark.parametrize(("name", "dim"), [("xflip", 3), ("yflip", 2)])
def test_a_flip_flips(name, dim):
    x = images()
    out, labels = AugmentPipe(p=1, **{name: 1})(x, gen(range(32)))
    flipped = labels[:, 0] == 1
    assert 5 < int(flipped.sum()) < 27  # a fair coin per sample
    assert torch.equal(out[flipped], x[flipped].flip(dim))
    assert torch.equal(out[~flipped], x[~flipped])


def test_xflip_1e8_flips_half_the_samples_at_small_p():
    """EDM's xflip=1e8: p * 1e8 >= 1, so every sample tosses the coin even at p=0.12."""
    _, labels = AugmentPipe(p=0.12, xflip=1e8)(images(400), gen(range(400)))
    assert 0.4 < labels[:, 0].mean() < 0.6


def test_integer_translation_shifts_with_reflection():
    x = images(64, h=8, w=8)
    out, labels = AugmentPipe(p=1, translate_int=1, translate_int_max=0.25)(x, gen(range(64)))
    tx = (labels[:, 0] * 8 * 0.25).round().long()
    ty = (labels[:, 1] * 8 * 0.25).round().long()
    assert tx.abs().max() == 2 and ty.abs().max() == 2
    for i in range(64):
        # out[y, x] = in[y + ty, x - tx] where the source is inside the image
        rows = slice(max(0, -ty[i]), 8 - max(0, ty[i]))
        cols = slice(max(0, tx[i]), 8 + min(0, tx[i]))
        src_rows = slice(rows.start + ty[i], rows.stop + ty[i])
        src_cols = slice(cols.start - tx[i], cols.stop - tx[i])
        assert torch.equal(out[i, :, rows, cols], x[i, :, src_rows, src_cols])
    # reflection at the border: a shift right by 1 repeats column 1 as column 0 (no edge repeat)
    i = int(((tx == 1) & (ty == 0)).nonzero()[0])
    assert torch.equal(out[i, :, :, 0], x[i, :, :, 1])


def test_quarter_turns_are_exact_rotations():
    x = images(32)
    out, labels = AugmentPipe(p=1, rotate_int=1)(x, gen(range(32)))
    quarter = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}
    for i in range(32):
        k = quarter[tuple(int(v) for v in labels[i])]
        # quarter k: x-flip (k=1,2), y-flip (k=2,3), transpose (k odd) = k turns of rot90
        assert torch.equal(out[i], torch.rot90(x[i], k, dims=(1, 2))), k


@pytest.mark.parametrize(
    "g_inv",
    [
        rotate2d(torch.tensor([0.7])),
        scale2d(torch.tensor([0.8]), torch.tensor([1.25])),
        translate2d(torch.tensor([1.3]), torch.tensor([-2.0])),
    ],
    ids=["rotate", "aniso_scale", "translate"],
)
def test_warp_resamples_a_smooth_image_at_the_mapped_coordinates(g_inv):
    """out(x, y) = f(G^-1 (x, y)) away from the reflected border, to the bilinear
    interpolation error at 2x (~1e-3 on an image of amplitude 1.5)."""
    h = w = 24
    xs, ys = centred_grid(h, w)
    f = smooth(xs, ys)[None, None]
    pts = g_inv[0].double() @ torch.stack([xs.flatten(), ys.flatten(), torch.ones(h * w)])
    expected = smooth(pts[0], pts[1]).view(h, w)
    out = warp(f, g_inv.double())
    err = (out[0, 0] - expected)[6:-6, 6:-6].abs().max()
    assert err < 0.002
    # the same map off by 1/20 pixel is clearly worse: the test resolves the alignment
    off = translate2d(torch.tensor([0.05]), torch.tensor([0.05])).double() @ g_inv.double()
    assert (warp(f, off)[0, 0] - expected)[6:-6, 6:-6].abs().max() > 2 * err


def test_rotation_labels_give_the_angle_of_the_warp():
    h = w = 24
    xs, ys = centred_grid(h, w)
    f = smooth(xs, ys)[None, None].float().expand(8, 1, h, w)
    out, labels = AugmentPipe(p=1, rotate_frac=1)(f, gen(range(8)))
    theta = torch.atan2(labels[:, 1], labels[:, 0] + 1).double()
    for i in range(8):
        pts = rotate2d(theta[i : i + 1])[0] @ torch.stack(
            [xs.flatten(), ys.flatten(), torch.ones(h * w)]
        )
        expected = smooth(pts[0], pts[1]).view(h, w)
        assert (out[i, 0] - expected)[6:-6, 6:-6].abs().max() < 0.002


def test_same_seed_same_augmentation_whatever_the_batch():
    """Sample i's augmentation depends on its seed only: alone, in another batch, reordered."""
    x = images(12, c=3, h=16, w=16)
    pipe = AugmentPipe(p=0.6, **EDM)
    seeds = list(range(100, 112))
    out, labels = pipe(x, gen(seeds))
    assert labels.any(dim=1).sum() >= 6
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    out_p, labels_p = pipe(x[perm], gen([seeds[i] for i in perm]))
    torch.testing.assert_close(out_p, out[perm], atol=1e-6, rtol=0)
    assert torch.equal(labels_p, labels[perm])
    for i in (0, 5):
        one, one_labels = pipe(x[i : i + 1], gen(seeds[i : i + 1]))
        torch.testing.assert_close(one, out[i : i + 1], atol=1e-6, rtol=0)
        assert torch.equal(one_labels, labels[i : i + 1])
    other, _ = pipe(x, gen(range(12)))
    assert not torch.allclose(other, out)


def test_check_augment_names_the_key():
    pipe = AugmentPipe(p=0.12, **EDM)
    check_augment(pipe, 9, (1, 16, 16))
    check_augment(None, 0, (2,))
    with pytest.raises(ConfigError, match=r"model.augment_dim=0 .* model.augment_dim=9"):
        check_augment(pipe, 0, (1, 16, 16))
    with pytest.raises(ConfigError, match="augment=none"):
        check_augment(pipe, 9, (2,))
    with pytest.raises(ConfigError, match="augment.rotate_int"):
        check_augment(AugmentPipe(rotate_int=1), 2, (1, 8, 16))


@pytest.mark.parametrize(
    "preset", ["unet_tiny", "unet_adm_tiny", "dit_tiny", "unet_edm2_tiny", "mlp_tiny"]
)
def test_networks_read_no_augment_labels_as_zero_labels(preset):
    """Sampling passes no augment labels: every network must read that as all-zero labels."""
    cfg = OmegaConf.create(
        {"label_dim": 0, "dataset": {"resolution": 8, "channels": 1, "num_classes": 0, "dim": 2}}
    )
    cfg.model = OmegaConf.merge(
        OmegaConf.load(CONF / "model" / f"{preset}.yaml"), {"augment_dim": 9}
    )
    torch.manual_seed(0)
    net = instantiate(cfg.model).eval()
    with torch.no_grad():
        for p in net.parameters():  # move zero-initialised weights off zero
            p.add_(0.1 * torch.randn_like(p))
        x = torch.randn((2, 2) if "mlp" in preset else (2, 1, 8, 8))
        c_noise = torch.randn(2)
        none = net(x, c_noise, None, None)
        zeros = net(x, c_noise, None, torch.zeros(2, 9))
        ones = net(x, c_noise, None, torch.ones(2, 9))
    scale = zeros.abs().max()
    torch.testing.assert_close(none, zeros, atol=1e-6 * scale, rtol=0)
    assert (ones - zeros).abs().max() > 1e-2 * scale  # the labels do reach the output


def test_edm_config_matches_edm_cifar10_settings():
    cfg = OmegaConf.load(CONF / "augment" / "edm.yaml")
    pipe = instantiate(cfg.augment)
    assert (pipe.p, pipe.xflip, pipe.yflip, pipe.scale) == (0.12, 1e8, 1, 1)
    assert (pipe.rotate_frac, pipe.aniso, pipe.translate_frac) == (1, 1, 1)
    assert (pipe.rotate_int, pipe.translate_int) == (0, 0)
    assert cfg.model.augment_dim == pipe.label_dim == 9
    assert math.isclose(pipe.translate_frac_std, 0.125) and math.isclose(pipe.scale_std, 0.2)


def test_device_path_warps_all_and_keeps_the_moved_ones(monkeypatch):
    """Off the CPU every image goes through the warp and the unmoved ones keep their input (no
    data-dependent branch); the result is the CPU path's: unmoved images bit for bit, warped
    ones to float rounding."""
    x = images(24, c=3, h=16, w=16)
    pipe = AugmentPipe(p=0.3, **EDM)
    selective, labels = pipe(x, gen(range(24)))
    monkeypatch.setattr(augment, "SELECTIVE_WARP_DEVICES", set())
    every, labels_all = pipe(x, gen(range(24)))
    assert torch.equal(labels_all, labels)
    unmoved = ~labels[:, 2:].any(dim=1)  # no scale, rotation, anisotropy or fractional shift
    assert 0 < int(unmoved.sum()) < 24
    assert torch.equal(every[unmoved], selective[unmoved])
    torch.testing.assert_close(every, selective, rtol=0, atol=1e-5)
