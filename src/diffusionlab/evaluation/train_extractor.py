"""Train the domain feature extractor (a small digit classifier) and store it in the cache
(the evaluator does on first use; ``dl-train-extractor`` on request)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusionlab.data import TensorImageDataset
from diffusionlab.data.datasets import split_indices
from diffusionlab.errors import ConfigError
from diffusionlab.evaluation.extractors import DomainClassifier, domain_weights_path, uint8_to_unit
from diffusionlab.files import atomic_write
from diffusionlab.sampling.images import to_uint8_rgb

log = logging.getLogger(__name__)


OUTLIER_WEIGHT = 0.5


def outliers(x: torch.Tensor, labels: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` non-digits in [-1, 1], uint8-quantised like ``x``: a third uniform noise, a third
    smooth noise blobs, a third blends (weights 0.35-0.65) of two digits of different classes."""
    k = n // 3
    shape = x.shape[1:]
    noise = torch.rand((k, *shape), generator=g) * 2 - 1
    small = torch.randn((k, shape[0], 4, 4), generator=g)
    blobs = F.interpolate(small, size=shape[1:], mode="bilinear", align_corners=False).tanh()
    m = n - 2 * k
    a = torch.randint(0, x.shape[0], (m,), generator=g)
    b = torch.randint(0, x.shape[0], (m,), generator=g)
    b = torch.where(labels[a] == labels[b], torch.roll(b, 1), b)
    w = 0.35 + 0.3 * torch.rand((m, 1, 1, 1), generator=g)
    blends = w * x[a] + (1 - w) * x[b]
    out = torch.cat([noise, blobs, blends])
    return uint8_to_unit(to_uint8_rgb(out), shape[0], shape[-1])


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 1e-2,
    seed: int = 0,
) -> DomainClassifier:
    """Fit a :class:`DomainClassifier` on ``images`` (float NCHW in [-1, 1], quantised to uint8
    exactly as evaluation sees them) with Adam and a cosine learning rate.

    Outlier exposure (Hendrycks et al. 2019, eq. 1): each step also sees a batch of non-digits
    (:func:`outliers`) whose target is the uniform distribution, so a confident prediction means
    a digit, not just any input (recognition.py thresholds that confidence)."""
    torch.manual_seed(seed)
    x = uint8_to_unit(to_uint8_rgb(images), images.shape[1], images.shape[-1])
    net = DomainClassifier(in_channels=images.shape[1], num_classes=num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=g)
        ood = outliers(x, labels, batch_size // 2, g)
        logits = net(torch.cat([x[idx], ood]))[1]
        loss = F.cross_entropy(logits[:batch_size], labels[idx])
        loss = loss - OUTLIER_WEIGHT * logits[batch_size:].log_softmax(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def accuracy(net: DomainClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy on ``images`` in [-1, 1]."""
    x = uint8_to_unit(to_uint8_rgb(images), images.shape[1], images.shape[-1])
    return (net(x)[1].argmax(1) == labels).float().mean().item()


def train_and_save(
    data: TensorImageDataset, dataset: str, cache_dir: str | Path, steps: int = 300, seed: int = 0
) -> tuple[Path, float]:
    """Train on the ``train`` split of labelled ``data`` (named ``dataset``), save to the cache;
    returns the path and the accuracy on the ``test`` split."""
    if not data.num_classes or data.labels is None:
        raise ConfigError(
            f"dataset {dataset!r} has no labels to train the domain extractor on; "
            "use eval.extractor=inception"
        )
    resolution = int(data.images.shape[-1])
    train, test = split_indices(len(data), "train"), split_indices(len(data), "test")
    t0 = time.time()
    net = train_classifier(
        data.images[train], data.labels[train], data.num_classes, steps, seed=seed
    )
    acc = accuracy(net, data.images[test], data.labels[test])
    path = domain_weights_path(cache_dir, dataset, resolution)
    state = {
        "state_dict": net.state_dict(),
        "config": net.config,
        "resolution": resolution,
        "accuracy": acc,
    }
    atomic_write(path, lambda f: torch.save(state, f))
    log.info("domain extractor %s: test accuracy %.4f in %.1fs", path, acc, time.time() - t0)
    return path, acc
