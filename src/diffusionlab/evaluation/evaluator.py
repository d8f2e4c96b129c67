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
    DINOV2_LAYER,
    INCEPTION,
    CombinedExtractor,
    create_extractor,
    default_layers,
    dinov2_name,
    domain_name,
    domain_weights_path,
)
from diffusionlab.evaluation.features import FeatureCache, Features, image_features
from diffusionlab.evaluation.metrics import DEFAULT_METRICS, METRICS, compute_metrics
from diffusionlab.evaluation.protocol import evaluate_generator
from diffusionlab.evaluation.reference import reference_features, reference_path
from diffusionlab.evaluation.train_extractor import train_and_save
from diffusionlab.files import file_sha256
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
    ``inception_weights``); ``fd_dinov2`` with DINOv2 from ``dinov2_weights``, in the same pass
    over the samples. Reference features are cached under ``cache_dir``, one file per
    extractor."""

    def __init__(
        self,
        data: TensorImageDataset,
        dataset: str,
        cache_dir: str | Path,
        extractor: str = "domain",
        split: str = "all",
        inception_weights: str | None = None,
        metrics: Sequence[str] = DEFAULT_METRICS,
        extractor_steps: int = 300,
        device: torch.device | str = "cpu",
        dinov2_weights: str | None = None,
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
            self.extractor_weights: str | None = str(inception_weights)
        else:
            self.extractor = self._domain_extractor(extractor_steps)
            resolution = int(data.images.shape[-1])
            self.extractor_weights = str(domain_weights_path(cache_dir, dataset, resolution))
        self.layers = default_layers(self.extractor.get_name())
        # every extractor the metrics need; samples go through all of them in one pass
        self.extractors = [self.extractor]
        self.dinov2_weights = dinov2_weights
        if "fd_dinov2" in self.metrics:
            name = dinov2_name(dinov2_weights)
            self.extractors.append(create_extractor(name, dinov2_weights, self.device))
            self.layers["fd_dinov2"] = DINOV2_LAYER
        self.features_extractor = (
            CombinedExtractor(self.extractors) if len(self.extractors) > 1 else self.extractor
        )
        self._reference: Features | None = None

    def _domain_extractor(self, steps: int):
        return domain_extractor(self.data, self.dataset, self.cache_dir, steps, self.device)

    @property
    def reference(self) -> Features:
        """Reference features of every extractor (cached on disk and in memory)."""
        if self._reference is None:
            merged: Features = {}
            for ext in self.extractors:
                merged.update(
                    reference_features(self.data, self.dataset, self.split, ext, self.cache_dir)
                )
            self._reference = merged
        return self._reference

    def reference_files(self) -> list[Path]:
        """The cached reference feature files behind :attr:`reference` (one per extractor)."""
        resolution = int(self.data.images.shape[-1])
        return [
            reference_path(self.cache_dir, self.dataset, self.split, resolution, e.get_name())
            for e in self.extractors
        ]

    def record(self) -> dict[str, str]:
        """What a metric depends on besides the samples: the reference statistics (files and
        SHA-256) and the extractors (names, weight files and SHA-256), for the protocol."""
        if self.metrics:
            _ = self.reference  # the files exist once the features do
        refs = self.reference_files()
        weights = [self.extractor_weights] + ([self.dinov2_weights] if len(refs) > 1 else [])
        return {
            "reference": ";".join(str(p) for p in refs),
            "reference_sha256": ";".join(_digest(p) for p in refs),
            "extractor": ";".join(e.get_name() for e in self.extractors),
            "extractor_weights": ";".join(str(w) for w in weights),
            "extractor_sha256": ";".join(_digest(w) for w in weights),
        }

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
            self.features_extractor,
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
        extractors = [
            {"name": self.extractor.get_name(), "weights": file_identity(self.extractor_weights)}
        ]
        if len(self.extractors) > 1:  # FD-DINOv2's features are kept beside the first's
            extractors.append(
                {
                    "name": self.extractors[1].get_name(),
                    "weights": file_identity(self.dinov2_weights),
                }
            )
        return FeatureCache(root, {**generation, "extractors": extractors})

    def score_images(self, images: Tensor, batch_size: int = 250) -> dict[str, float]:
        """Metrics of uint8 RGB ``images`` [N, 3, H, W] (e.g. a folder of PNGs)."""
        feats = image_features(
            lambda idx: images[idx], images.shape[0], self.features_extractor, batch_size
        )
        return compute_metrics(feats, self.reference, self.layers, self.metrics)


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _digest(path: str | Path | None) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime); ``-`` when there is no file."""
    if path is None or not Path(path).is_file():
        return "-"
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_sha256(path)
    return _DIGESTS[key]
