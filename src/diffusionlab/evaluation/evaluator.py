"""One object that knows the dataset, the feature extractor and the cached reference features,
and scores generators or image sets against them; shared by the FID callback and the apps."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from diffusionlab.data import TensorImageDataset
from diffusionlab.distributed import is_main, together
from diffusionlab.errors import ConfigError
from diffusionlab.evaluation.extractors import (
    INCEPTION,
    create_extractor,
    default_layers,
    domain_name,
    domain_weights_path,
)
from diffusionlab.evaluation.features import FeatureCache, Features, image_features
from diffusionlab.evaluation.metrics import METRICS, compute_metrics
from diffusionlab.evaluation.protocol import evaluate_generator
from diffusionlab.evaluation.reference import reference_features
from diffusionlab.evaluation.train_extractor import train_and_save
from diffusionlab.sampling.generator import DiffusionGenerator
from diffusionlab.sampling.writer import file_identity

log = logging.getLogger(__name__)
EXTRACTORS = ("domain", "inception")


def dataset_key(target: str, path: str | None = None) -> str:
    """Short cache name of a dataset from its config ``_target_`` (``diffusionlab.data.mnist`` ->
    ``mnist``); image folders add a hash of their path."""
    name = target.rsplit(".", 1)[-1]
    if path:
        name += "-" + hashlib.sha1(str(Path(path).expanduser().resolve()).encode()).hexdigest()[:8]
    return name


def domain_weights(
    data: TensorImageDataset, dataset: str, cache_dir: str | Path, steps: int = 300
) -> Path:
    """The weights file of the domain classifier of ``data`` (named ``dataset``), trained on its
    ``train`` split by rank 0 on first use while the other processes wait. Call it on every
    process and outside a ``together`` block (inside one the others would not wait)."""
    path = domain_weights_path(cache_dir, dataset, int(data.images.shape[-1]))
    with together():  # a failure or a stop on rank 0 reaches the others
        if is_main() and not path.is_file():
            log.info("training the domain feature extractor -> %s", path)
            train_and_save(data, dataset, cache_dir, steps)
    return path


def domain_extractor(
    data: TensorImageDataset,
    dataset: str,
    cache_dir: str | Path,
    steps: int = 300,
    device: torch.device | str = "cpu",
) -> FeatureExtractorBase:
    """The domain classifier of ``data`` (named ``dataset``) from the cache, trained on its
    ``train`` split on first use (:func:`domain_weights`)."""
    path = domain_weights(data, dataset, cache_dir, steps)
    return create_extractor(domain_name(dataset, int(data.images.shape[-1])), path, device)


class Evaluator:
    """Metrics against ``split`` of ``data`` (named ``dataset``) with the ``extractor`` (``domain``:
    the classifier trained on this dataset, trained on first use; ``inception``: InceptionV3 from
    ``inception_weights``). Reference features are cached under ``cache_dir``."""

    def __init__(
        self,
        data: TensorImageDataset,
        dataset: str,
        cache_dir: str | Path,
        extractor: str = "domain",
        split: str = "all",
        inception_weights: str | None = None,
        metrics: Sequence[str] = METRICS,
        extractor_steps: int = 300,
        device: torch.device | str = "cpu",
    ) -> None:
        if extractor not in EXTRACTORS:
            raise ConfigError(f"eval.extractor={extractor!r}: choose one of {EXTRACTORS}")
        unknown = set(metrics) - set(METRICS)
        if unknown:
            raise ConfigError(f"eval.metrics has unknown {sorted(unknown)}; choose from {METRICS}")
        self.data, self.dataset, self.split = data, dataset, split
        self.cache_dir = Path(cache_dir)
        self.metrics = list(metrics)
        self.device = torch.device(device)
        if extractor == "inception":
            self.extractor = create_extractor(INCEPTION, inception_weights, self.device)
        else:
            self.extractor = self._domain_extractor(extractor_steps)
        self.layers = default_layers(self.extractor.get_name())
        self.extractor_weights = (
            inception_weights
            if extractor == "inception"
            else domain_weights_path(self.cache_dir, dataset, int(data.images.shape[-1]))
        )
        self._reference: Features | None = None

    def _domain_extractor(self, steps: int):
        return domain_extractor(self.data, self.dataset, self.cache_dir, steps, self.device)

    @property
    def reference(self) -> Features:
        """Reference features (cached on disk and in memory)."""
        if self._reference is None:
            self._reference = reference_features(
                self.data, self.dataset, self.split, self.extractor, self.cache_dir
            )
        return self._reference

    def score_generator(
        self,
        generator: DiffusionGenerator,
        ranges: Sequence[Sequence[int]],
        batch_size: int = 64,
        class_label: int | None = None,
        progress: bool = False,
        cache: FeatureCache | None = None,
    ) -> dict[str, float]:
        """Metrics of ``generator`` over each seed range (min / mean / max when several); the
        samples' features kept in ``cache`` (see :meth:`feature_cache`) are not made again."""
        return evaluate_generator(
            generator,
            self.extractor,
            self.reference,
            self.layers,
            ranges,
            self.metrics,
            batch_size,
            class_label,
            progress,
            cache,
        )

    def feature_cache(self, root: str | Path, generation: dict) -> FeatureCache:
        """Where the features of the samples of ``generation`` (every setting a sample depends on
        besides its seed) by this extractor are kept under ``root``."""
        extractor = {
            "name": self.extractor.get_name(),
            "weights": file_identity(self.extractor_weights),
        }
        return FeatureCache(root, {**generation, "extractor": extractor})

    def score_images(self, images: Tensor, batch_size: int = 250) -> dict[str, float]:
        """Metrics of uint8 RGB ``images`` [N, 3, H, W] (e.g. a folder of PNGs)."""
        feats = image_features(lambda idx: images[idx], images.shape[0], self.extractor, batch_size)
        return compute_metrics(feats, self.reference, self.layers, self.metrics)
