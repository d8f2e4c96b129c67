"""Latent datasets: encoded once and cached, stale caches re-encoded, unit-std scaled latents,
clear errors for a missing autoencoder or mismatched shapes."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

import diffusionlab.data.latent as latent_mod
from diffusionlab.data.latent import latent
from diffusionlab.errors import ConfigError
from diffusionlab.networks.autoencoder import AutoencoderKL
from diffusionlab.training.autoencoder import save_autoencoder

ARCH = {
    "in_channels": 1,
    "latent_channels": 4,
    "channels": 8,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
}
DIGITS = {"_target_": "diffusionlab.data.digits", "resolution": 8, "channels": 1, "num_classes": 10}


@pytest.fixture
def ae_file(tmp_path):
    torch.manual_seed(0)
    ae = AutoencoderKL(**ARCH)
    path = tmp_path / "ae" / "autoencoder.ckpt"
    save_autoencoder(path, ae, ARCH, {})
    return path


@pytest.fixture
def encodes(monkeypatch):
    """Counts the calls of the encoder pass."""
    calls = []
    real = latent_mod.encode_images

    def counting(ae, images, batch_size=256):
        calls.append(len(images))
        return real(ae, images, batch_size)

    monkeypatch.setattr(latent_mod, "encode_images", counting)
    return calls


def _latent(ae_file, cache, source=DIGITS, **kw):
    return latent(
        str(ae_file),
        source,
        str(cache),
        kw.pop("channels", 4),
        kw.pop("resolution", 4),
        num_classes=10,
        **kw,
    )


def test_encoded_once_then_read_from_cache(ae_file, tmp_path, encodes):
    first = _latent(ae_file, tmp_path / "cache")
    second = _latent(ae_file, tmp_path / "cache")
    assert encodes == [1797]  # the second dataset came from the cache file
    assert len(list((tmp_path / "cache" / "latents").glob("digits-*.pt"))) == 1
    torch.testing.assert_close(first.images, second.images, rtol=0, atol=0)
    # the cached latents are the posterior means of the source images, times the scale factor
    mean, _ = first.autoencoder.encode(first.source.images[:5])
    torch.testing.assert_close(first.images[:5], mean * first.latent["scale_factor"])
    assert first.shape == (4, 4, 4) and first.labels.equal(first.source.labels)
    assert first.latent["image_shape"] == [1, 8, 8]


def test_scale_factor_gives_unit_std_latents(ae_file, tmp_path):
    data = _latent(ae_file, tmp_path / "cache")
    raw_std = float((data.images / data.latent["scale_factor"]).std())
    assert abs(raw_std - 1) > 0.1  # the raw latents are not unit-std by chance
    assert float(data.images.std()) == pytest.approx(1.0, abs=1e-5)
    assert data.latent["scale_factor"] == pytest.approx(1 / raw_std, rel=1e-5)


def test_stale_cache_is_encoded_again(ae_file, tmp_path, encodes, caplog):
    folder = tmp_path / "pngs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
    source = {
        "_target_": "diffusionlab.data.image_folder",
        "path": str(folder),
        "resolution": 8,
        "channels": 1,
        "num_classes": 0,
    }
    before = latent(str(ae_file), source, str(tmp_path / "cache"), 4, 4).images.clone()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / "0.png")  # same config
    with caplog.at_level(logging.WARNING, logger="diffusionlab.data.latent"):
        after = latent(str(ae_file), source, str(tmp_path / "cache"), 4, 4).images
    assert encodes == [4, 4] and "stale latent cache" in caplog.text
    assert not torch.allclose(before[0], after[0])  # the changed image has a new latent
    # a different autoencoder gets its own cache entry
    save_autoencoder(ae_file, AutoencoderKL(**ARCH), ARCH, {})
    latent(str(ae_file), source, str(tmp_path / "cache"), 4, 4)
    assert encodes == [4, 4, 4] and len(list((tmp_path / "cache" / "latents").iterdir())) == 2


def test_clear_errors(ae_file, tmp_path):
    with pytest.raises(ConfigError, match=r"dataset.autoencoder='.*nope.ckpt' does not exist"):
        _latent(tmp_path / "nope.ckpt", tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"dataset.channels=3, dataset.resolution=4 do not match"
        r".* 4x4x4 .* set dataset.channels=4 dataset.resolution=4",
    ):
        _latent(ae_file, tmp_path, channels=3)
    odd = {**DIGITS, "resolution": 7}
    with pytest.raises(ConfigError, match=r"dataset.source images are 1x7x7 .* divisible by 2"):
        _latent(ae_file, tmp_path, source=odd)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not an autoencoder written by dl-train-autoencoder"):
        _latent(tmp_path / "junk.ckpt", tmp_path)
