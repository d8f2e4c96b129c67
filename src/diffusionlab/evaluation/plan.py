"""What ``evaluate.py`` is asked to do, as a typed plan built once from its config: every value a
user can get wrong is checked here, with a message naming its key, before a model is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusionlab.checks import number, numbers, sampler_numbers
from diffusionlab.data.datasets import SPLITS
from diffusionlab.diffusion.guidance import check_guidance_interval
from diffusionlab.errors import ConfigError
from diffusionlab.evaluation.metrics import METRICS
from diffusionlab.evaluation.protocol import seed_ranges
from diffusionlab.networks.dinov2 import dinov2_file
from diffusionlab.sampling.checkpoint import dataset_config, pick_device

BPD_METHODS = ("ode", "vlb")


@dataclass(frozen=True)
class ScoreSettings:
    """``eval.*``: how samples are scored. ``num_samples`` per seed range, ``repeats`` ranges from
    ``first_seed`` (EDM reports the min of 3), ``metrics`` against the reference features of
    ``split`` with the ``extractor`` (cached in ``cache_dir``), ``recognition`` by the domain
    classifier at ``recognition_threshold``."""

    num_samples: int
    repeats: int
    first_seed: int
    batch_size: int
    metrics: tuple[str, ...]
    recognition: bool
    recognition_threshold: float
    split: str
    extractor: str
    inception_weights: str | None
    cache_dir: str
    extractor_steps: int
    dinov2_weights: str | None = None

    @property
    def seed_ranges(self) -> list[range]:
        return seed_ranges(self.num_samples, self.repeats, self.first_seed)


@dataclass(frozen=True)
class BitsPerDim:
    """``bpd.*``: bits/dim of the first ``num_images`` reference images (0 = off) through the
    probability-flow ODE (``ode``: ``divergence`` estimator, RK45 ``tolerance``) or iDDPM's bound
    (``vlb``), ``batch_size`` images at a time."""

    num_images: int
    method: str
    divergence: str
    batch_size: int
    tolerance: float


@dataclass(frozen=True)
class NFESweep:
    """``nfe_sweep.*``: every sampler x discretization (``grids`` from ``discretizations``, [] =
    the sampler's own) x NFE."""

    samplers: tuple[str, ...]
    nfe: tuple[int, ...]
    grids: tuple[str, ...]


@dataclass(frozen=True)
class GuidanceSweep:
    """``guidance_sweep.weights`` x ``guidance_sweep.intervals``: every guidance weight with every
    interval (None = guidance at every sigma); empty = no guidance sweep."""

    weights: tuple[float, ...] = ()
    intervals: tuple[tuple[float, float] | None, ...] = (None,)

    @property
    def points(self) -> list[tuple[float, tuple[float, float] | None]]:
        return [(w, i) for w in self.weights for i in self.intervals]


@dataclass(frozen=True)
class EvaluationPlan:
    """One evaluation: the checkpoints (``ckpt``, one or several) or a folder of ``images``, the
    reference ``dataset``, the ``sampler`` config node (a spec per checkpoint, learned grids beside
    it), guidance (and its sigma interval), the NFE and guidance sweeps, the post-hoc EMA sweep
    (``ema_sigma_rels`` rebuilt from ``ema_snapshots``), bits/dim, and where results go."""

    ckpts: tuple[str, ...]
    images: str | None
    dataset: DictConfig
    sampler: dict[str, Any]
    guidance: float
    guidance_interval: tuple[float, float] | None
    guide_ckpt: str | None
    use_ema: bool
    class_label: int | None
    score: ScoreSettings
    sweep: NFESweep
    ema_sigma_rels: tuple[float, ...]
    ema_snapshots: str | None
    bpd: BitsPerDim
    device: torch.device
    output_dir: Path
    guidance_sweep: GuidanceSweep = GuidanceSweep()

    @property
    def ema_sweep(self) -> bool:
        """Several checkpoints (or post-hoc EMA lengths of one) scored by EMA length."""
        return len(self.ckpts) > 1 or bool(self.ema_sigma_rels)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> EvaluationPlan:
        """The plan of an ``evaluate.yaml`` config, every setting checked."""
        ckpts = tuple(
            [str(c) for c in cfg.ckpt]
            if isinstance(cfg.ckpt, ListConfig)
            else [str(cfg.ckpt)]
            if cfg.ckpt
            else []
        )
        if bool(ckpts) == bool(cfg.images):
            raise ConfigError("pass exactly one of ckpt=... or images=...")
        bpd = cfg.bpd
        if bpd.get("method", "ode") not in BPD_METHODS:
            raise ConfigError(f"bpd.method={bpd.method!r} must be ode or vlb")
        sigma_rels = tuple(numbers(cfg, "ema_sweep.sigma_rels")) if cfg.ema_sweep.sigma_rels else ()
        if sigma_rels and len(ckpts) != 1:
            raise ConfigError(
                "ema_sweep.sigma_rels needs one ckpt=<run>/checkpoints/last.ckpt of an ema=power run"
            )
        several = len(ckpts) > 1 or bool(sigma_rels)
        if several and (cfg.nfe_sweep.samplers or bpd.num_images or cfg.guide_ckpt):
            raise ConfigError(
                "nfe_sweep.samplers, bpd.num_images and guide_ckpt need a single ckpt (no list, no "
                "ema_sweep)"
            )
        guidance_sweep = _guidance_sweep(cfg)
        if guidance_sweep.weights and (several or not ckpts):
            raise ConfigError(
                "guidance_sweep.weights needs a single ckpt (no list, no ema_sweep, no images)"
            )
        score = _score_settings(cfg, several)
        guidance = float(number(cfg, "guidance"))
        sampler_numbers(cfg)
        return cls(
            ckpts=ckpts,
            images=str(cfg.images) if cfg.images else None,
            dataset=dataset_config(cfg.get("dataset"), ckpts[0] if ckpts else None, cfg.paths),
            sampler=OmegaConf.to_container(cfg.sampler, resolve=True),
            guidance=guidance,
            guidance_interval=check_guidance_interval(
                OmegaConf.to_container(cfg.guidance_interval)
                if OmegaConf.is_config(cfg.get("guidance_interval"))
                else cfg.get("guidance_interval")
            ),
            guide_ckpt=str(cfg.guide_ckpt) if cfg.guide_ckpt else None,
            use_ema=bool(cfg.use_ema),
            class_label=cfg.class_label,
            score=score,
            sweep=NFESweep(
                samplers=tuple(cfg.nfe_sweep.samplers),
                nfe=tuple(int(n) for n in cfg.nfe_sweep.nfe),
                grids=tuple(cfg.nfe_sweep.get("discretizations") or ()),
            ),
            ema_sigma_rels=sigma_rels,
            ema_snapshots=str(cfg.ema_sweep.snapshots) if cfg.ema_sweep.snapshots else None,
            bpd=BitsPerDim(
                num_images=int(bpd.num_images),
                method=str(bpd.get("method", "ode")),
                divergence=str(bpd.divergence),
                batch_size=int(bpd.batch_size),
                tolerance=float(bpd.tolerance),
            ),
            device=pick_device(cfg.device),
            output_dir=Path(cfg.paths.output_dir),
            guidance_sweep=guidance_sweep,
        )


def _guidance_sweep(cfg: DictConfig) -> GuidanceSweep:
    """``guidance_sweep.weights`` (weights) x ``guidance_sweep.intervals`` (each ``[lo, hi]`` or null;
    default: guidance at every sigma), checked."""
    weights = cfg.guidance_sweep.get("weights") or []
    if not weights:
        return GuidanceSweep()
    ws = tuple(float(number(OmegaConf.create({"w": w}), "w")) for w in weights)
    raw = cfg.guidance_sweep.get("intervals")
    raw = [None] if raw is None or len(raw) == 0 else OmegaConf.to_container(raw)
    intervals = tuple(
        check_guidance_interval(i, f"guidance_sweep.intervals[{k}]") for k, i in enumerate(raw)
    )
    return GuidanceSweep(ws, intervals)


def _score_settings(cfg: DictConfig, several: bool) -> ScoreSettings:
    """``eval.*`` checked: sample counts, metric names, recognition, split."""
    e = cfg.eval
    number(cfg, "eval.num_samples", int, at_least=2)  # FID needs a covariance
    for key in ("eval.repeats", "eval.batch_size"):
        number(cfg, key, int, at_least=1)
    metrics = OmegaConf.to_container(e, resolve=True).get("metrics")
    recognition = bool(e.get("recognition", False))
    if not isinstance(metrics, list) or not set(metrics) <= set(METRICS):
        raise ConfigError(f"eval.metrics={metrics!r} must be a list drawn from {list(METRICS)}")
    if not metrics and not recognition:
        raise ConfigError("eval.metrics=[] and eval.recognition=false: nothing to evaluate")
    if not metrics and (several or cfg.nfe_sweep.samplers):
        raise ConfigError(
            "eval.metrics=[]: the FID sweeps (ckpt list, nfe_sweep.samplers) need FID"
        )
    if recognition:
        number(cfg, "eval.recognition_threshold", above=0.0)
    if e.split not in SPLITS:
        raise ConfigError(f"eval.split={e.split!r} must be all, train or test")
    dinov2_weights = e.get("dinov2_weights")
    if "fd_dinov2" in metrics:  # a missing file stops here, before any sampling
        dinov2_weights = str(dinov2_file(dinov2_weights, "eval.dinov2_weights"))
    return ScoreSettings(
        num_samples=int(e.num_samples),
        repeats=int(e.repeats),
        first_seed=int(e.first_seed),
        batch_size=int(e.batch_size),
        metrics=tuple(metrics),
        recognition=recognition,
        recognition_threshold=float(e.get("recognition_threshold", 0.9)),
        split=str(e.split),
        extractor=str(e.extractor),
        inception_weights=e.inception_weights,
        cache_dir=str(e.cache_dir),
        extractor_steps=int(e.extractor_steps),
        dinov2_weights=dinov2_weights,
    )
