"""The KL autoencoder: closed-form KL, shapes, and a reconstruction bound on held-out digits."""

import pytest
import torch

from diffusionlab.data import digits
from diffusionlab.networks.autoencoder import AutoencoderKL, LatentDecoder, load_autoencoder
from diffusionlab.training.autoencoder import (
    kl_divergence,
    reconstruction_mse,
    save_autoencoder,
    split_held_out,
    train_autoencoder,
)

TINY = {
    "in_channels": 1,
    "latent_channels": 4,
    "channels": 16,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
}


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    ref = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(kl_divergence(mean, logvar), ref)
    assert float(kl_divergence(torch.zeros(1, 4), torch.zeros(1, 4))) == 0.0


def test_latent_shape_and_factor():
    ae = AutoencoderKL(in_channels=1, latent_channels=4, channels=8, channel_mult=[1, 2, 2])
    x = torch.zeros(2, 1, 32, 32)
    mean, logvar = ae.encode(x)
    assert ae.factor == 4 and mean.shape == logvar.shape == (2, 4, 8, 8)
    assert ae.latent_shape((1, 32, 32)) == (4, 8, 8)
    assert ae.decode(mean).shape == x.shape


def test_reconstruction_error_bounded_on_held_out_digits(tmp_path):
    torch.manual_seed(0)
    images = digits(resolution=8).images
    train_idx, held_idx = split_held_out(len(images), 0.1, seed=0)
    ae = AutoencoderKL(**TINY)
    before = reconstruction_mse(ae, images[held_idx])
    out = train_autoencoder(
        ae,
        images[train_idx],
        steps=150,
        batch_size=32,
        lr=2e-3,
        kl_weight=1e-5,
        recon="l1",
        seed=0,
        log_every=0,
    )
    after = reconstruction_mse(ae, images[held_idx])
    assert out["steps"] == 150
    assert before > 0.2 and after < 0.05, (before, after)
    # the saved file rebuilds the same autoencoder; a latent decoder reads its weights
    save_autoencoder(tmp_path / "ae.ckpt", ae, TINY, {"held_out_mse": after})
    loaded, ckpt = load_autoencoder(tmp_path / "ae.ckpt")
    assert ckpt["meta"]["held_out_mse"] == after
    assert reconstruction_mse(loaded, images[held_idx]) == pytest.approx(after, rel=1e-6)
    dec = LatentDecoder(loaded.config, scale_factor=2.0, image_shape=(1, 8, 8))
    dec.load_from(loaded)
    z = loaded.encode(images[:4])[0]
    torch.testing.assert_close(dec(2.0 * z), loaded.decode(z).clamp(-1, 1))
