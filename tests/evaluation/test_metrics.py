"""FID / KID / PR numbers: closed form on Gaussians, ~0 on identical sets, real < model < noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from diffusionlab.data.datasets import split_indices
from diffusionlab.evaluation.features import dataset_images, generated_features, image_features
from diffusionlab.evaluation.metrics import compute_metrics, frechet_distance, statistics
from diffusionlab.evaluation.reference import reference_path
from diffusionlab.sampling.checkpoint import load_module
from diffusionlab.sampling.generator import DiffusionGenerator
from diffusionlab.sampling.spec import SamplerSpec


def closed_form_fd(mu1, s1, mu2, s2) -> float:
    """Frechet distance between N(mu1, s1) and N(mu2, s2) with scipy's matrix square root."""
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _random_gaussian(d: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    a = rng.normal(size=(d, d))
    return rng.normal(size=d), a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_equals_closed_form_for_exact_statistics():
    rng = np.random.default_rng(0)
    mu1, s1 = _random_gaussian(6, rng)
    mu2, s2 = _random_gaussian(6, rng)
    expected = closed_form_fd(mu1, s1, mu2, s2)
    assert expected > 1.0
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_fid_of_gaussian_features_equals_distance_between_the_gaussians():
    rng = np.random.default_rng(1)
    d, n = 4, 200_000
    mu1, s1 = _random_gaussian(d, rng)
    mu2, s2 = _random_gaussian(d, rng)
    f1 = torch.from_numpy(rng.multivariate_normal(mu1, s1, size=n)).float()
    f2 = torch.from_numpy(rng.multivariate_normal(mu2, s2, size=n)).float()
    fid = compute_metrics({"f": f1}, {"f": f2}, {"fid": "f"}, metrics=("fid",))["fid"]
    expected = closed_form_fd(mu1, s1, mu2, s2)
    # sampling error of the moments at n = 2e5 is about 1e-2 relative here
    assert fid == pytest.approx(expected, rel=2e-2)
    mu, sigma = statistics(f1)
    np.testing.assert_allclose(mu, mu1, atol=2e-2)
    np.testing.assert_allclose(sigma, s1, atol=3e-2)


def test_fid_of_a_set_against_itself_is_zero(reference, layers):
    out = compute_metrics(reference, reference, layers, metrics=("fid", "prc"))
    assert abs(out["fid"]) < 1e-6
    assert out["precision"] == 1.0 and out["recall"] == 1.0


def test_domain_extractor_is_accurate(domain):
    assert domain[2] > 0.9


def _heldout_and_noise(mnist, extractor, reference, layers) -> tuple[dict, dict]:
    """Metrics of the 1,000 held-out test images and of as many clamped-noise images."""
    test = mnist.images[split_indices(len(mnist), "test")]
    heldout = compute_metrics(
        image_features(dataset_images(test), len(test), extractor), reference, layers
    )
    noise_images = torch.randn(test.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    noise = compute_metrics(
        image_features(dataset_images(noise_images), len(test), extractor), reference, layers
    )
    return heldout, noise


def test_heldout_real_beats_model_beats_noise(mnist, extractor, reference, layers, generator):
    heldout, noise = _heldout_and_noise(mnist, extractor, reference, layers)
    model = compute_metrics(
        generated_features(generator, extractor, range(300), 100), reference, layers
    )
    assert heldout["fid"] < model["fid"] < noise["fid"]
    assert heldout["kid_mean"] < model["kid_mean"] < noise["kid_mean"]
    assert heldout["precision"] > 0.8 and noise["precision"] < 0.05
    assert heldout["is_mean"] > noise["is_mean"]


def test_reference_features_are_cached_once(mnist, extractor, reference, cache_dir):
    path = reference_path(cache_dir, "mnist", "train", 16, extractor.get_name())
    assert path.is_file()
    stamp = path.stat().st_mtime_ns
    from diffusionlab.evaluation.reference import reference_features

    again = reference_features(mnist, "mnist", "train", extractor, cache_dir)
    assert path.stat().st_mtime_ns == stamp
    assert torch.equal(again["features"], reference["features"])
    assert again["features"].shape[0] == len(split_indices(len(mnist), "train"))


def test_corrupt_cached_reference_features_are_recomputed(mnist, extractor, reference, tmp_path):
    from diffusionlab.evaluation.reference import reference_features

    path = reference_path(tmp_path, "mnist", "train", 16, extractor.get_name())
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a torch file")
    again = reference_features(mnist, "mnist", "train", extractor, tmp_path)
    assert torch.equal(again["features"], reference["features"])
    assert torch.load(path, weights_only=True)["features"].shape == again["features"].shape


def test_corrupt_extractor_weights_name_the_file(tmp_path):
    from diffusionlab.errors import ConfigError
    from diffusionlab.evaluation.extractors import DomainFeatureExtractor

    bad = tmp_path / "extractor.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ConfigError, match=r"extractor\.pt.*unreadable.*delete the file"):
        DomainFeatureExtractor("domain", ["features"], feature_extractor_weights_path=str(bad))


def test_splits_partition_the_dataset():
    train, test = split_indices(5000, "train"), split_indices(5000, "test")
    assert len(test) == 1000 and len(train) == 4000
    assert torch.equal(torch.cat([train, test]).sort().values, torch.arange(5000))


@pytest.mark.slow
def test_trained_default_model_lies_between_heldout_and_noise(
    tmp_path, mnist, extractor, reference, layers
):
    """The default recipe (MNIST-16, unet_tiny, EDM) trained by ``train.py`` for 1,000 steps."""
    from app.helpers import run_app

    train = run_app(
        "train.py",
        [
            "trainer.max_steps=1000",
            "logger=csv",
            "~callbacks.rich_progress_bar",
            "callbacks.sample_grid.every_n_steps=0",
            f"paths.log_dir={tmp_path}",
        ],
        timeout=900,
    )
    assert train.returncode == 0, train.stderr[-2000:]
    module = load_module(str(next(tmp_path.rglob("last.ckpt"))), torch.device("cpu"))
    generator = DiffusionGenerator.from_module(module, SamplerSpec(name="heun", nfe=17))
    model = compute_metrics(
        generated_features(generator, extractor, range(500), 100), reference, layers
    )
    heldout, noise = _heldout_and_noise(mnist, extractor, reference, layers)
    assert heldout["fid"] < model["fid"] < noise["fid"] / 10
    assert heldout["kid_mean"] < model["kid_mean"] < noise["kid_mean"]
