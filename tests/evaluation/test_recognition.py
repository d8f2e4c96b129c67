"""Recognition rate by the domain classifier: closed-form confidences, real held-out digits (ratio
1, every class), noise (not recognised), class accuracy against requested labels, and evaluate.py's
eval.recognition on a folder of PNGs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from diffusionlab.cli.evaluate import evaluate
from diffusionlab.config import CONF_DIR
from diffusionlab.data.datasets import split_indices
from diffusionlab.errors import ConfigError
from diffusionlab.evaluation.extractors import DomainClassifier, create_extractor
from diffusionlab.evaluation.recognition import (
    THRESHOLD,
    generate_labelled,
    recognition_metrics,
    recognition_rate,
)
from diffusionlab.sampling.images import to_uint8_rgb

RES = 16


@pytest.fixture(scope="module")
def classifier(domain) -> DomainClassifier:
    name, path, _ = domain
    return create_extractor(name, path).net


@pytest.fixture(scope="module")
def held_out(mnist) -> tuple[torch.Tensor, torch.Tensor]:
    idx = split_indices(len(mnist), "test")
    return mnist.images[idx], mnist.labels[idx]


def constant_classifier(probs: list[float]) -> DomainClassifier:
    """A classifier whose softmax is ``probs`` for every image (zero weights, log-prob bias)."""
    net = DomainClassifier(num_classes=len(probs))
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor(probs).log())
    return net.eval()


def test_threshold_on_closed_form_confidences():
    x = torch.zeros(8, 1, RES, RES)
    p = [0.95] + [0.05 / 9] * 9
    assert recognition_rate(constant_classifier(p), x, RES, 0.9) == 1.0
    assert recognition_rate(constant_classifier(p), x, RES, 0.96) == 0.0
    m = recognition_metrics(constant_classifier(p), x, x, RES, torch.tensor([0] * 6 + [3] * 2))
    assert m["recognition_ratio"] == 1.0
    assert m["classes_present"] == 1.0
    assert m["class_accuracy"] == pytest.approx(6 / 8)
    flat = recognition_metrics(constant_classifier([0.1] * 10), x, x, RES)
    assert flat["recognition"] == 0.0 and flat["classes_present"] == 0.0
    assert flat["recognition_ratio"] == 0.0  # no real image recognised either: 0, not a NaN


def test_real_held_out_digits_are_recognised_in_every_class(classifier, held_out):
    images, labels = held_out
    m = recognition_metrics(classifier, images, images, RES, labels)
    assert m["recognition_ratio"] == 1.0
    assert 0.5 < m["recognition_real"] <= 1.0  # the 150-step test classifier; 300 steps: 0.85
    assert m["classes_present"] == 10
    assert m["class_accuracy"] > 0.85
    wrong = recognition_metrics(classifier, images, images, RES, (labels + 1) % 10)
    assert wrong["class_accuracy"] < 0.1


def test_noise_and_blur_are_not_recognised(classifier, held_out):
    images, _ = held_out
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert recognition_metrics(classifier, noise, images, RES)["recognition_ratio"] < 0.3
    # the mean of two different digits is a hybrid no class claims with confidence
    hybrid = (images[:200] + images[200:400].flip(0)) / 2
    assert recognition_rate(classifier, hybrid, RES) < 0.6 * recognition_rate(
        classifier, images, RES
    )


def test_bad_threshold_names_the_key(classifier, held_out):
    images, _ = held_out
    with pytest.raises(ConfigError, match="eval.recognition_threshold"):
        recognition_metrics(classifier, images[:4], images[:4], RES, threshold=1.0)


def test_generate_labelled_returns_the_requested_labels(generator, classifier, held_out):
    """The analytic per-class Gaussians: requested labels come back with the images, and a fixed
    class_label gives that class everywhere."""
    images, labels = generate_labelled(generator, range(6), batch_size=4)
    assert images.shape == (6, 1, RES, RES) and labels.shape == (6,)
    again, _ = generate_labelled(generator, range(6), batch_size=6)
    torch.testing.assert_close(images, again)
    _, fixed = generate_labelled(generator, range(3), class_label=7)
    assert fixed.tolist() == [7, 7, 7]


def test_evaluate_recognition_of_a_folder(mnist, domain, cache_dir, held_out, tmp_path):
    images, _ = held_out
    folder = tmp_path / "real"
    folder.mkdir()
    for i, img in enumerate(to_uint8_rgb(images[::3])[:, 0].numpy()):  # sorted by class
        Image.fromarray(img).save(folder / f"{i:06d}.png")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "evaluate",
            [
                f"images={folder}",
                "dataset=mnist16",
                f"eval.cache_dir={cache_dir}",
                "eval.metrics=[]",
                "eval.recognition=true",
                f"paths.output_dir={tmp_path / 'out'}",
            ],
        )
    metrics = evaluate(cfg)["metrics"]
    assert set(metrics) == {
        "recognition",
        "recognition_real",
        "recognition_ratio",
        "classes_present",
    }
    real = recognition_rate(create_extractor(domain[0], domain[1]).net, images, RES, THRESHOLD)
    assert metrics["recognition_real"] == pytest.approx(real)
    assert math.isclose(metrics["recognition_ratio"], metrics["recognition"] / real)
    assert 0.8 < metrics["recognition_ratio"] < 1.25 and metrics["classes_present"] == 10
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["metrics"] == metrics


def test_evaluate_with_nothing_to_compute_names_both_keys(tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "evaluate",
            ["images=x", "dataset=mnist16", "eval.metrics=[]", f"paths.output_dir={tmp_path}"],
        )
    with pytest.raises(ConfigError, match=r"eval.metrics=\[\] and eval.recognition=false"):
        evaluate(cfg)
