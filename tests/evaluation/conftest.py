"""Evaluation fixtures: no network at all, one domain extractor trained per session, and an
analytic class-conditional "model" (per-class Gaussians fitted to the embedded MNIST)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import torch
import torch.hub

from diffusionlab.diffusion.analytic import Gaussian
from diffusionlab.diffusion.schedules import get_schedule
from diffusionlab.evaluation.extractors import create_extractor, default_layers, domain_name
from diffusionlab.evaluation.reference import load_dataset, reference_features
from diffusionlab.evaluation.train_extractor import train_and_save
from diffusionlab.sampling.conditioning import ClassLabels
from diffusionlab.sampling.generator import DiffusionGenerator
from diffusionlab.sampling.spec import SamplerSpec

RESOLUTION = 16


def _no_network(*args, **kwargs):
    raise RuntimeError("network access attempted in an offline test")


@pytest.fixture(scope="session", autouse=True)
def offline(tmp_path_factory):
    """Any download attempt fails loudly; torch hub points at an empty directory."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        mp.setenv(var, "http://127.0.0.1:9")
    mp.setattr(torch.hub, "download_url_to_file", _no_network)
    mp.setattr(torch.hub, "load_state_dict_from_url", _no_network)
    mp.setattr(urllib.request, "urlopen", _no_network)
    yield
    mp.undo()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dl_cache")


@pytest.fixture(scope="session")
def mnist():
    return load_dataset("mnist", RESOLUTION)


@pytest.fixture(scope="session")
def domain(cache_dir, mnist):
    """(registry name, weights path, test accuracy) of the domain extractor, trained once."""
    path, acc = train_and_save(mnist, "mnist", cache_dir, steps=150)
    return domain_name("mnist", RESOLUTION), path, acc


@pytest.fixture(scope="session")
def extractor(domain):
    name, path, _ = domain
    return create_extractor(name, path)


@pytest.fixture(scope="session")
def layers(domain):
    return default_layers(domain[0])


@pytest.fixture(scope="session")
def reference(mnist, extractor, cache_dir):
    return reference_features(mnist, "mnist", "train", extractor, cache_dir)


class ClassGaussians:
    """D(x; sigma, labels) of per-class Gaussians fitted to the data (labels one-hot)."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, diagonal: bool = False
    ) -> None:
        x = images.flatten(1).double()
        self.classes = []
        for k in range(num_classes):
            xk = x[labels == k]
            if diagonal:
                cov = xk.var(0) + 1e-3
            else:
                cov = torch.cov(xk.T) + 1e-3 * torch.eye(x.shape[1], dtype=x.dtype)
            self.classes.append(Gaussian(xk.mean(0), cov))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor):
        x64 = x.double()
        out = torch.empty_like(x64)
        sigma = torch.as_tensor(sigma, dtype=x64.dtype).expand(x.shape[0])
        cls = labels.argmax(1)
        for k in cls.unique().tolist():
            m = cls == k
            out[m] = self.classes[k].denoise(x64[m], sigma[m])
        return out.to(x.dtype)


@pytest.fixture(scope="session")
def class_gaussians(mnist) -> ClassGaussians:
    return ClassGaussians(mnist.images, mnist.labels, 10)


@pytest.fixture(scope="session")
def generator(class_gaussians) -> DiffusionGenerator:
    return DiffusionGenerator(
        class_gaussians,
        get_schedule("edm"),
        (1, RESOLUTION, RESOLUTION),
        condition=ClassLabels(10),
        spec=SamplerSpec(name="heun", nfe=9),
    )
