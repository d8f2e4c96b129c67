"""Reference features of a dataset, computed once per (dataset, split, resolution, extractor) and
cached as ``<cache_dir>/fid-refs/<dataset>-<split>-<resolution>-<extractor>.pt``."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from diffusionlab.data import TensorImageDataset, digits, mnist
from diffusionlab.data.datasets import split_indices
from diffusionlab.distributed import is_main, together
from diffusionlab.errors import ConfigError
from diffusionlab.evaluation.features import Features, dataset_images, image_features
from diffusionlab.files import atomic_write

log = logging.getLogger(__name__)

EMBEDDED = {"mnist": mnist, "digits": digits}


def load_dataset(name: str, resolution: int) -> TensorImageDataset:
    """An embedded dataset (``mnist`` or ``digits``) at ``resolution``."""
    if name not in EMBEDDED:
        raise ConfigError(f"dataset {name!r} is not embedded; choose one of {sorted(EMBEDDED)}")
    return EMBEDDED[name](resolution=resolution)


def reference_path(
    cache_dir: str | Path, dataset: str, split: str, resolution: int, extractor: str
) -> Path:
    """Cache file of the reference features for this (dataset, split, resolution, extractor)."""
    return Path(cache_dir) / "fid-refs" / f"{dataset}-{split}-{resolution}-{extractor}.pt"


def reference_features(
    data: TensorImageDataset,
    dataset: str,
    split: str,
    extractor: FeatureExtractorBase,
    cache_dir: str | Path,
    batch_size: int = 250,
) -> Features:
    """Features of ``split`` of ``data`` (named ``dataset``), from the cache or computed once
    (sharded over processes; rank 0 writes the file)."""
    resolution = int(data.images.shape[-1])
    path = reference_path(cache_dir, dataset, split, resolution, extractor.get_name())
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or foreign file: the cache is rebuilt, not trusted
            log.warning("cached reference features %s unreadable (%s); recomputing", path, e)
    images = data.images[split_indices(len(data), split)]
    feats = image_features(dataset_images(images), images.shape[0], extractor, batch_size)
    with together():
        if is_main():
            atomic_write(path, lambda f: torch.save(feats, f))
            log.info("cached reference features %s (%d images)", path, images.shape[0])
    return feats
