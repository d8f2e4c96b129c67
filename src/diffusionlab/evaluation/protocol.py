"""The sampling protocol for reported numbers: N samples with one seed per sample index, optionally
repeated over several seed ranges and summarised by min and mean (EDM reports the min of 3)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from diffusionlab.evaluation.features import Features, generated_features
from diffusionlab.evaluation.generator import DiffusionGenerator
from diffusionlab.evaluation.metrics import METRICS, compute_metrics


def parse_seeds(spec: str | int | Sequence[int] | None, n: int) -> list[int]:
    """Seeds from ``"0-63,100"`` (EDM's syntax), an int (one seed), a list, or None (0..n-1)."""
    if spec is None:
        return list(range(n))
    if isinstance(spec, int):
        return [spec]
    if not isinstance(spec, str):
        return [int(s) for s in spec]
    seeds: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        seeds.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    return seeds


def seed_ranges(num_samples: int, repeats: int = 1, first_seed: int = 0) -> list[range]:
    """``repeats`` disjoint ranges of ``num_samples`` seeds: 0..N-1, N..2N-1, ..."""
    return [
        range(first_seed + r * num_samples, first_seed + (r + 1) * num_samples)
        for r in range(repeats)
    ]


def summarize(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per-metric values of several runs -> the first run's values plus ``<key>_min``/``_mean``
    (and ``_max`` for metrics where larger is better) when there is more than one run."""
    out = dict(runs[0])
    if len(runs) > 1:
        for key in runs[0]:
            values = np.array([r[key] for r in runs])
            out[f"{key}_min"] = float(values.min())
            out[f"{key}_mean"] = float(values.mean())
            out[f"{key}_max"] = float(values.max())
    return out


def evaluate_generator(
    generator: DiffusionGenerator,
    extractor: FeatureExtractorBase,
    reference: Features,
    layers: dict[str, str],
    ranges: Sequence[Sequence[int]],
    metrics: Sequence[str] = METRICS,
    batch_size: int = 64,
    class_label: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Metrics of ``generator`` for each seed range (sharded over processes), summarised."""
    runs = []
    for seeds in ranges:
        feats = generated_features(generator, extractor, seeds, batch_size, class_label, progress)
        runs.append(compute_metrics(feats, reference, layers, metrics))
    return summarize(runs)
