"""The sampling protocol for reported numbers: N samples with one seed per sample index, optionally
repeated over several seed ranges and summarised by min and mean (EDM reports the min of 3)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from diffusionlab.errors import ConfigError
from diffusionlab.evaluation.features import FeatureCache, Features, generated_features
from diffusionlab.evaluation.metrics import METRICS, compute_metrics
from diffusionlab.sampling.generator import DiffusionGenerator

SEED_FORMS = "seeds=0-63, seeds=5, seeds=[0,1,2], seeds=[0-9,20] or seeds=0-9,20"


def parse_seeds(spec: str | int | Sequence[int | str] | None, n: int) -> list[int]:
    """Seeds from EDM's ``"0-63,100"`` syntax, an int, a list whose items are ints or ``"a-b"``
    ranges, or None (``0 .. n-1``). Raises :class:`ConfigError` naming ``seeds`` (or ``n``)."""
    if spec is None:
        if n < 1:
            raise ConfigError(f"n={n} must be >= 1")
        return list(range(n))
    parts = (
        spec.split(",") if isinstance(spec, str) else spec if isinstance(spec, Sequence) else [spec]
    )
    seeds: list[int] = []
    for part in parts:
        seeds.extend(_seed_part(part, spec))
    if not seeds:
        raise ConfigError(f"seeds={spec!r} gives no seeds; use {SEED_FORMS}")
    return seeds


def _seed_part(part: int | str, spec) -> list[int]:
    """One item: an int ``5`` or an inclusive range ``"0-63"`` of non-negative seeds."""
    if isinstance(part, bool) or not isinstance(part, int | str):
        raise ConfigError(f"seeds={spec!r}: cannot read {part!r}; use {SEED_FORMS}")
    if isinstance(part, int):
        lo, hi = part, part
    else:
        text = part.strip()
        lo_s, dash, hi_s = text.partition("-")
        if not (lo_s.isdigit() and (hi_s.isdigit() if dash else True)):
            raise ConfigError(f"seeds={spec!r}: cannot read {text!r}; use {SEED_FORMS}")
        lo, hi = int(lo_s), int(hi_s) if dash else int(lo_s)
    if lo < 0 or hi < lo:
        raise ConfigError(f"seeds={spec!r}: {part!r} is not a range of seeds >= 0 (low-high)")
    return list(range(lo, hi + 1))


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
    cache: FeatureCache | None = None,
) -> dict[str, float]:
    """Metrics of ``generator`` for each seed range (sharded over processes, features kept in
    ``cache`` when given), summarised."""
    runs = []
    for seeds in ranges:
        feats = generated_features(
            generator, extractor, seeds, batch_size, class_label, progress, cache
        )
        runs.append(compute_metrics(feats, reference, layers, metrics))
    return summarize(runs)
