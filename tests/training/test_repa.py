"""REPA (training/repa.py): the alignment loss's closed form, the coefficient schedule, the
projector and loss on the block of every network family, the encoders (the digit classifier and
a tiny randomly initialised DINOv2 written to a temporary file), the per-image target cache, and
the training app end to end."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from app.helpers import compose_train, fast_overrides
from diffusionlab.cli.train import train
from diffusionlab.config import CONF_DIR
from diffusionlab.errors import ConfigError
from diffusionlab.networks.dinov2 import DINOv2
from diffusionlab.networks.encoders import DomainClassifier, build_encoder
from diffusionlab.sampling.checkpoint import load_module
from diffusionlab.training.repa import (
    RepaHead,
    RepaSettings,
    alignment_loss,
    as_tokens,
    resize_tokens,
)


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def domain_file(tmp_path, resolution: int = 16):
    """A randomly initialised digit classifier saved as the domain extractor's cache file."""
    torch.manual_seed(0)
    net = DomainClassifier()
    path = tmp_path / f"domain-{resolution}.pt"
    state = {"state_dict": net.state_dict(), "config": net.config, "resolution": resolution}
    torch.save(state, path)
    return path


def dinov2_file(tmp_path):
    torch.manual_seed(0)
    model = DINOv2(384, 1, 6, 14, 56)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(model.state_dict(), path)
    return path


def test_alignment_loss_closed_form():
    """-mean_n cos(h_n, y_n) (REPA eq. 8): -1 on identical (or positively scaled) tokens, +1
    on opposite ones, 0 on orthogonal ones, the mean of per-token cosines otherwise."""
    h = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(alignment_loss(h, h), torch.full((3,), -1.0))
    torch.testing.assert_close(alignment_loss(2 * h, 0.5 * h), torch.full((3,), -1.0))
    torch.testing.assert_close(alignment_loss(h, -h), torch.full((3,), 1.0))
    e = torch.eye(2).expand(4, 2, 2)
    torch.testing.assert_close(alignment_loss(e, e.flip(-1)), torch.zeros(4))
    y = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
    cos = torch.nn.functional.cosine_similarity(h, y, dim=-1)
    torch.testing.assert_close(alignment_loss(h, y), -cos.mean(-1))


@pytest.mark.parametrize(
    ("schedule", "values"),
    [
        ("constant", [0.5, 0.5, 0.5, 0.5]),
        ("cutoff", [0.5, 0.5, 0.0, 0.0]),
        ("linear", [0.5, 0.25, 0.0, 0.0]),
        ("cosine", [0.5, 0.25, 0.0, 0.0]),
    ],
)
def test_coefficient_schedule(schedule, values):
    until = None if schedule == "constant" else 100
    s = RepaSettings({"name": "domain"}, schedule=schedule, until=until)
    got = [s.coefficient_at(step) for step in (0, 50, 100, 200)]
    assert got == pytest.approx(values, abs=1e-12)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"encoder": {"name": "domain"}, "schedule": "linear"}, "needs repa.until"),
        ({"encoder": {"name": "domain"}, "coefficient": -1}, "repa.coefficient"),
        ({"encoder": {"name": "domain"}, "cache": "maybe"}, "repa.cache"),
        ({"encoder": {"name": "domain"}, "lambda": 1}, "repa.lambda is not a REPA setting"),
        ({"encoder": "dinov2"}, "repa.encoder must be a node"),
    ],
)
def test_bad_settings_are_named(config, message):
    with pytest.raises(ConfigError, match=message):
        RepaSettings.from_dict(config)


def _network(model: str, resolution: int = 16):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", [f"model={model}", "dataset=mnist16", "label_dim=10"])
    cfg.model.img_resolution = resolution
    return instantiate(cfg.model)


@pytest.mark.parametrize(
    ("model", "block", "width", "grid"),
    [
        ("unet_tiny", "enc.8x8_block0", 32, (8, 8)),  # DDPM++ (SongUNet)
        ("unet_edm2_tiny", "enc.8x8_block0", 32, (8, 8)),
        ("unet_adm_tiny", "enc.8x8_block0", 32, (8, 8)),
        ("dit_tiny", "blocks.0", 128, (8, 8)),  # 4 blocks: the first third
    ],
)
def test_projector_and_loss_on_every_network(tmp_path, model, block, width, grid):
    """The default block, its width probed, the projector's tokens resized to the encoder's
    grid (digit classifier stage 1: 16x16 tokens of 32-d), a per-sample loss in [-1, 1] whose
    gradient reaches the projector and the network below the block."""
    net = _network(model)
    encoder = build_encoder(
        {"name": "domain", "weights": str(domain_file(tmp_path)), "stage": 1}, (1, 16, 16)
    )
    assert encoder.grid == (16, 16) and encoder.dim == 32
    settings = RepaSettings({"name": "domain"}, encoder_dim=encoder.dim, projector_dim=24)
    head = RepaHead(settings, net, (1, 16, 16), 10)
    rng = torch.get_rng_state()
    assert head.tap.probe(net, (1, 16, 16), 10).shape[0] == 1
    assert torch.equal(torch.get_rng_state(), rng) and net.training  # probing draws nothing
    assert head.settings.block == block and head.settings.feature_dim == width
    assert [m.out_features for m in head.projector if hasattr(m, "out_features")] == [24, 24, 32]
    head.attach(encoder, None, hflip=False, augment=False)
    x0 = torch.rand(3, 1, 16, 16) * 2 - 1
    labels = torch.eye(10)[:3]
    with head.tap.capture():
        net(x0 + 0.5 * torch.randn_like(x0), torch.full((3,), 0.5), class_labels=labels)
    tokens, got_grid = as_tokens(head.tap.value)
    assert got_grid == grid and tokens.shape == (3, grid[0] * grid[1], width)
    loss = head.loss(head.tap.value, x0)
    assert loss.shape == (3,) and bool((loss.abs() <= 1).all())
    loss.sum().backward()
    assert head.projector[0].weight.grad.abs().sum() > 0
    tapped = list(net.get_submodule(block).parameters())
    assert sum(float(p.grad.abs().sum()) for p in tapped if p.grad is not None) > 0
    with pytest.raises(ConfigError, match="repa.block='nowhere' is not a submodule"):
        RepaHead(
            RepaSettings({"name": "domain"}, encoder_dim=32, block="nowhere"), net, (1, 16, 16), 10
        )


def test_resize_tokens_keeps_a_constant_grid():
    h = torch.ones(2, 16, 3) * torch.tensor([1.0, 2.0, 3.0])
    for target in ((2, 2), (8, 8)):
        out = resize_tokens(h, (4, 4), target)
        assert out.shape == (2, target[0] * target[1], 3)
        torch.testing.assert_close(out, torch.ones_like(out) * torch.tensor([1.0, 2.0, 3.0]))


def test_dinov2_encoder_from_a_local_file(tmp_path):
    path = dinov2_file(tmp_path)
    enc = build_encoder({"name": "dinov2", "weights": str(path), "resolution": 28}, (3, 32, 32))
    assert enc.grid == (2, 2) and enc.dim == 384
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    tokens = enc(x)
    assert tokens.shape == (2, 4, 384) and not tokens.requires_grad
    grey = enc(x[:, :1])  # grey images are repeated to RGB
    torch.testing.assert_close(grey, enc(x[:, :1].expand(-1, 3, -1, -1)))
    assert build_encoder({"name": "dinov2", "weights": str(path)}, (3, 64, 64)).grid == (16, 16)
    missing = tmp_path / "none" / "dinov2_vitb14_pretrain.pth"
    with pytest.raises(ConfigError) as e:
        build_encoder({"name": "dinov2", "weights": str(missing)}, (3, 32, 32))
    assert "repa.encoder.weights" in str(e.value) and str(missing) in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="multiple of 14"):
        build_encoder({"name": "dinov2", "weights": str(path), "resolution": 30}, (3, 32, 32))


def test_cached_targets_equal_the_encoder_on_every_view(tmp_path):
    """Targets cached per (image, flipped) view at the start equal the encoder's tokens of the
    view a batch holds; augmentation or cache=on without data in memory are refused clearly."""
    encoder = build_encoder({"name": "domain", "weights": str(domain_file(tmp_path))}, (1, 16, 16))
    net = _network("unet_tiny")
    head = RepaHead(RepaSettings({"name": "domain"}, encoder_dim=encoder.dim), net, (1, 16, 16), 10)
    images = torch.rand(5, 1, 16, 16) * 2 - 1
    head.attach(encoder, images, hflip=True, augment=False)
    assert head._cache is not None and head._cache.shape[:2] == (5, 2)
    index, flipped = torch.tensor([3, 0, 4]), torch.tensor([1, 0, 1])
    x0 = torch.stack(
        [images[i].flip(-1) if f else images[i] for i, f in zip(index, flipped, strict=True)]
    )
    torch.testing.assert_close(head.targets(x0, 2 * index + flipped), encoder(x0))
    head.attach(encoder, images, hflip=False, augment=True)
    assert head._cache is None  # augmented images: computed per step
    on = RepaHead(
        RepaSettings({"name": "domain"}, encoder_dim=encoder.dim, cache="on"), net, (1, 16, 16), 10
    )
    with pytest.raises(ConfigError, match="repa.cache=on: the dataset is not held in memory"):
        on.attach(encoder, None, hflip=False, augment=False)


def test_train_app_with_repa_end_to_end(tmp_path):
    """train.py repa=domain: the alignment term logged beside the diffusion loss (their weighted
    sum is the loss), the network initialised as without REPA, and the checkpoint sampled by the
    one loader."""
    weights = domain_file(tmp_path, resolution=8)
    base = [*fast_overrides(tmp_path), "label_dim=10", "trainer.max_steps=2"]
    repa = [
        "repa=domain",
        f"repa.encoder.weights={weights}",
        "repa.encoder.stage=1",
        "repa.projector_dim=16",
        "repa.coefficient=0.7",
    ]
    off = compose_train(base, tmp_path / "off")
    on = compose_train([*base, *repa], tmp_path / "on")
    from diffusionlab.cli.train import build

    torch.manual_seed(5)
    m_off, _ = build(off)
    torch.manual_seed(5)
    m_on, _ = build(on)
    for (name, p), q in zip(
        m_off.denoiser.net.state_dict().items(),
        m_on.denoiser.net.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(p, q), name  # REPA draws nothing from the process RNG
    train(on)
    with open(next((tmp_path / "on").rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/repa_align")]
    assert rows
    for r in rows:
        total, diff, align = (
            float(r[k]) for k in ("train/loss", "train/diffusion_loss", "train/repa_align")
        )
        assert -1 <= align <= 1 and math.isclose(total, diff + 0.7 * align, rel_tol=1e-5)
    ckpt = next((tmp_path / "on").rglob("last.ckpt"))
    module = load_module(str(ckpt), "cpu")
    assert module.repa is not None and module.repa.settings.block == "enc.4x4_block0"
    assert module.repa.settings.encoder["weights"] == str(weights)
