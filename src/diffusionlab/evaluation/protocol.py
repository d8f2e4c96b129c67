"""The protocol of reported numbers: N samples with one seed per sample index, optionally repeated
over disjoint seed blocks and summarised by min, mean, std and max (EDM reports the min of 3), and
the record of everything a FID depends on (:class:`Protocol`), written beside every metric row so
that two numbers can be compared (reference statistics, samples and seeds, sampler and NFE,
guidance, EMA, class sampling, extractor)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from diffusionlab.errors import ConfigError
from diffusionlab.evaluation.features import FeatureCache, Features, generated_features
from diffusionlab.evaluation.metrics import DEFAULT_METRICS, compute_metrics
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


def seeds_text(ranges: Sequence[Sequence[int]]) -> str:
    """Seed blocks as EDM writes them: ``0-1999`` or ``0-1999,2000-3999`` (one item per block;
    a block that is not a run of consecutive seeds is listed seed by seed)."""
    parts = []
    for block in ranges:
        block = list(block)
        if block == list(range(block[0], block[0] + len(block))):
            parts.append(f"{block[0]}-{block[-1]}" if len(block) > 1 else str(block[0]))
        else:
            parts.append(",".join(str(s) for s in block))
    return ",".join(parts)


def summarize(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per-metric values of several runs (disjoint seed blocks) -> the first run's values plus
    ``<key>_min``, ``_mean``, ``_std`` (sample standard deviation, ddof 1) and ``_max`` when
    there is more than one run."""
    out = dict(runs[0])
    if len(runs) > 1:
        for key in runs[0]:
            values = np.array([r[key] for r in runs])
            out[f"{key}_min"] = float(values.min())
            out[f"{key}_mean"] = float(values.mean())
            out[f"{key}_std"] = float(values.std(ddof=1))
            out[f"{key}_max"] = float(values.max())
    return out


PREFIX = "protocol."


@dataclass(frozen=True)
class Protocol:
    """Everything a metric depends on besides the model's weights: the reference statistics
    (``dataset``, ``split``, ``reference`` files and their SHA-256), the ``extractor`` (registry
    names, weight files and SHA-256), ``num_samples`` per seed block, ``repeats`` disjoint blocks
    (``seeds``), the checkpoint, the sampler (``sampler``, ``nfe``, ``discretization``,
    ``sampler_options`` as JSON, ``noise``), guidance (weight, ``guidance_interval`` as
    ``lo,hi`` or empty, ``guide_ckpt``), the weights sampled (``ema``) and how classes were
    chosen (``class_sampling``). Several extractors (FD-DINOv2) are ``;``-joined."""

    dataset: str
    split: str
    reference: str
    reference_sha256: str
    extractor: str
    extractor_weights: str
    extractor_sha256: str
    num_samples: int
    repeats: int
    seeds: str
    ckpt: str = ""
    sampler: str = ""
    nfe: int = 0
    discretization: str = ""
    sampler_options: str = "{}"
    noise: str = ""
    guidance: float = 1.0
    guidance_interval: str = ""
    guide_ckpt: str = ""
    ema: str = ""
    class_sampling: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: Mapping) -> Protocol:
        """A protocol from :meth:`to_dict` or read back from a CSV (strings converted)."""
        types = {f.name: f.type for f in fields(cls)}
        missing = sorted(set(types) - set(record))
        if missing:
            raise ValueError(f"protocol record lacks {missing}")
        kinds = {"int": int, "float": float}
        return cls(**{k: kinds.get(types[k], str)(record[k]) for k in types})

    def row(self) -> dict:
        """Columns ``protocol.<field>`` for a metric row (CSV, W&B table)."""
        return {PREFIX + k: v for k, v in self.to_dict().items()}

    @classmethod
    def from_row(cls, row: Mapping) -> Protocol:
        """The protocol of a metric row written with :meth:`row`."""
        return cls.from_dict({k[len(PREFIX) :]: v for k, v in row.items() if k.startswith(PREFIX)})

    def with_sampling(self, spec, guidance: float, interval) -> Protocol:
        """This protocol for another sampler ``spec`` / guidance (a sweep's row)."""
        return Protocol(
            **{
                **self.to_dict(),
                **sampling_fields(spec),
                "guidance": float(guidance),
                "guidance_interval": interval_text(interval),
            }
        )


def sampling_fields(spec) -> dict:
    """The protocol's sampler fields of a :class:`~diffusionlab.sampling.spec.SamplerSpec`."""
    return {
        "sampler": spec.name,
        "nfe": int(spec.nfe or 0),
        "discretization": str(spec.discretization),
        "sampler_options": json.dumps(dict(spec.options), sort_keys=True),
        "noise": str(spec.noise),
    }


def interval_text(interval: Sequence[float] | None) -> str:
    """``lo,hi`` of a guidance interval; empty for guidance at every sigma."""
    return "" if interval is None else f"{float(interval[0]):g},{float(interval[1]):g}"


def evaluate_generator(
    generator: DiffusionGenerator,
    extractor: FeatureExtractorBase,
    reference: Features,
    layers: dict[str, str],
    ranges: Sequence[Sequence[int]],
    metrics: Sequence[str] = DEFAULT_METRICS,
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
