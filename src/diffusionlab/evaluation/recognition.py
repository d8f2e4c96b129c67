"""Recognition rate: how often the domain classifier (trained on the ``train`` split) recognises
generated digits, relative to held-out real digits at the same resolution.

An image is *recognised* when the classifier's softmax confidence in its top class is at least
``threshold`` (0.9 by default: a real held-out 16x16 MNIST digit passes about 0.95 of the time, a
blurry or hybrid sample rarely does). The rate of samples divided by the rate of real ``test``
digits is the *recognition ratio* (1 = as recognisable as real data). ``classes_present`` counts the
distinct top classes among recognised samples (mode collapse shows here), and ``class_accuracy``
is the fraction of samples whose top class is the class they were generated for (guidance).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffusionlab.errors import ConfigError
from diffusionlab.evaluation.extractors import DomainClassifier, uint8_to_unit
from diffusionlab.sampling.generator import DiffusionGenerator
from diffusionlab.sampling.images import to_uint8_rgb

THRESHOLD = 0.9


@torch.no_grad()
def classify(
    net: DomainClassifier, images: Tensor, resolution: int, batch_size: int = 500
) -> tuple[Tensor, Tensor]:
    """(top-class softmax confidence, top class) of float images in [-1, 1], quantised to uint8
    and resized to the classifier's ``resolution`` exactly as evaluation sees them."""
    device = next(net.parameters()).device
    conf, cls = [], []
    for start in range(0, images.shape[0], batch_size):
        x = to_uint8_rgb(images[start : start + batch_size])
        x = uint8_to_unit(x.to(device), net.config["in_channels"], resolution)
        p = net(x)[1].softmax(1)
        c, k = p.max(1)
        conf.append(c.cpu())
        cls.append(k.cpu())
    return torch.cat(conf), torch.cat(cls)


def recognition_rate(
    net: DomainClassifier, images: Tensor, resolution: int, threshold: float = THRESHOLD
) -> float:
    """Fraction of ``images`` whose top-class confidence is >= ``threshold``."""
    conf, _ = classify(net, images, resolution)
    return (conf >= threshold).float().mean().item()


def recognition_metrics(
    net: DomainClassifier,
    images: Tensor,
    real_images: Tensor,
    resolution: int,
    labels: Tensor | None = None,
    threshold: float = THRESHOLD,
) -> dict[str, float]:
    """``recognition`` (rate of ``images``), ``recognition_real`` (rate of ``real_images``, which
    the classifier must not have trained on), ``recognition_ratio``, ``classes_present`` and, with
    the requested ``labels``, ``class_accuracy``."""
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"eval.recognition_threshold={threshold} must be in (0, 1)")
    conf, cls = classify(net, images, resolution)
    recognised = conf >= threshold
    rate = recognised.float().mean().item()
    real = recognition_rate(net, real_images, resolution, threshold)
    out = {
        "recognition": rate,
        "recognition_real": real,
        "recognition_ratio": rate / real if real > 0 else 0.0,
        "classes_present": float(cls[recognised].unique().numel()),
    }
    if labels is not None:
        out["class_accuracy"] = (cls == labels.cpu()).float().mean().item()
    return out


@torch.no_grad()
def generate_labelled(
    generator: DiffusionGenerator,
    seeds: Sequence[int],
    batch_size: int = 64,
    class_label: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One image per seed (in [-1, 1], CPU) and its requested label (None when unconditional)."""
    seeds = list(seeds)
    images, labels = [], []
    for start in range(0, len(seeds), batch_size):
        noise, lab, gen = generator.seeded_inputs(seeds[start : start + batch_size], class_label)
        images.append(generator.sample_images(noise, lab, gen).cpu())
        if lab is not None:
            labels.append(lab.cpu())
    return torch.cat(images), torch.cat(labels) if labels else None
