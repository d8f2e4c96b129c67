"""The evaluation procedures behind ``evaluate.py``, run from an :class:`EvaluationPlan`: metrics of
one checkpoint (with NFE and guidance sweeps, recognition and bits/dim), of several checkpoints or
post-hoc EMA lengths by EMA length, or of a folder of images. Results go to ``metrics.json``,
``metrics.csv`` and the sweep tables and plots beside it, every row with its protocol
(evaluation/protocol.py); the app sends them on to W&B."""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from hydra.utils import instantiate
from torch import Tensor

from diffusionlab.data.datasets import TensorImageDataset, split_indices
from diffusionlab.distributed import broadcast_object, is_main, together
from diffusionlab.errors import ConfigError
from diffusionlab.evaluation.bits_per_dim import bits_per_dim
from diffusionlab.evaluation.evaluator import (
    Evaluator,
    dataset_key,
    domain_extractor,
    domain_weights,
)
from diffusionlab.evaluation.features import FeatureCache
from diffusionlab.evaluation.images import load_images
from diffusionlab.evaluation.plan import EvaluationPlan
from diffusionlab.evaluation.protocol import Protocol, interval_text, sampling_fields, seeds_text
from diffusionlab.evaluation.recognition import generate_labelled, recognition_metrics
from diffusionlab.evaluation.sweep_plots import plot_fid_curve
from diffusionlab.evaluation.tables import write_csv, write_sweep_table
from diffusionlab.files import atomic_write_text
from diffusionlab.sampling.checkpoint import load_guide, load_module
from diffusionlab.sampling.generator import DiffusionGenerator
from diffusionlab.sampling.spec import SamplerSpec
from diffusionlab.sampling.writer import file_identity
from diffusionlab.training.ema_snapshots import SNAPSHOT_FOLDER, write_reconstructions
from diffusionlab.training.module import DiffusionModule

log = logging.getLogger(__name__)
# under the run directory: the generated samples' features, kept until the evaluation ends
FEATURES = "generated_features"


@dataclass
class Loaded:
    """What :func:`load` read and checked before anything runs: the checkpoints to score (the
    post-hoc EMA reconstructions for ``ema_sigma_rels``), and for a single checkpoint its module,
    guide, sampler spec and the NFE sweep's specs."""

    ckpts: list[str]
    module: DiffusionModule | None = None
    guide: DiffusionModule | None = None
    spec: SamplerSpec | None = None
    sweep: list[SamplerSpec] = field(default_factory=list)


def load(plan: EvaluationPlan) -> Loaded:
    """Read and check everything the plan scores, so that a bad file or setting stops before a
    result is logged: EMA reconstructions are written, a single checkpoint (and its guide) is
    loaded, its sampler spec, the swept specs and the bits/dim method checked against it."""
    if plan.images:
        return Loaded([])
    if plan.ema_sweep:
        if not plan.ema_sigma_rels:
            return Loaded(list(plan.ckpts))
        with together():  # rank 0 writes them, the others read them
            paths = reconstructed_checkpoints(plan) if is_main() else None
        return Loaded(broadcast_object(paths))
    with together():  # a file one process cannot read stops all of them
        return _load_one(plan)


def _load_one(plan: EvaluationPlan) -> Loaded:
    (ckpt,) = plan.ckpts
    module = load_module(ckpt, plan.device)
    guide = load_guide(plan.guide_ckpt, module)
    spec = SamplerSpec.from_config(plan.sampler, ckpt=ckpt)
    if plan.bpd.num_images and module.decoder is not None:
        raise ConfigError("bpd.num_images: bits/dim needs a pixel-space model, not a latent one")
    spec.check(module.schedule)
    if plan.bpd.num_images and plan.bpd.method == "vlb":
        param = module.denoiser.parameterization
        if not (param.learned_variance and module.schedule.discrete):
            raise ConfigError(
                "bpd.method=vlb needs a model trained on a discrete schedule with "
                f"parameterization.learned_variance=true (ckpt has {param}, {module.schedule})"
            )
    sweep = sweep_specs(plan, spec, ckpt)
    for swept in sweep:
        swept.check(module.schedule, "nfe_sweep.samplers")
    return Loaded([ckpt], module, guide, spec, sweep)


def reconstructed_checkpoints(plan: EvaluationPlan) -> list[str]:
    """The single checkpoint's EMA rebuilt at each of ``ema_sigma_rels`` from its run's snapshots
    (``<run>/ema_snapshots`` or ``ema_snapshots``) into ``<output_dir>/ema_reconstructed/``."""
    (ckpt,) = plan.ckpts
    snapshots = plan.ema_snapshots or Path(ckpt).resolve().parents[1] / SNAPSHOT_FOLDER
    paths = write_reconstructions(
        ckpt,
        snapshots,
        list(plan.ema_sigma_rels),
        plan.output_dir / "ema_reconstructed",
        keys=("ckpt", "ema_sweep.snapshots", "ema_sweep.sigma_rels"),
    )
    return [str(p) for p in paths]


def sweep_specs(plan: EvaluationPlan, spec: SamplerSpec, ckpt: str) -> list[SamplerSpec]:
    """The swept sampler specs: every sampler x grid (``nfe_sweep.discretizations``, default the discretization
    of ``spec``; ``learned`` reads the grids fitted beside ``ckpt``) x NFE."""
    grids = plan.sweep.grids or (spec.discretization,)
    return [
        SamplerSpec.from_config(
            {"name": name, "nfe": nfe, "discretization": grid}, ckpt=ckpt, key="nfe_sweep"
        )
        for name in plan.sweep.samplers
        for grid in grids
        for nfe in plan.sweep.nfe
    ]


@dataclass
class Curve:
    """A sweep's rows and what to plot: FID against ``x``, one line per ``series``; ``table`` and
    ``plot`` name them (``nfe_sweep`` / ``fid_vs_nfe``)."""

    table: str
    plot: str
    rows: list[dict]
    x: str
    series: str | None


@dataclass
class Outcome:
    """The result written to ``metrics.json`` and the sweep curves behind it."""

    result: dict
    curves: list[Curve] = field(default_factory=list)


def run_evaluation(plan: EvaluationPlan, loaded: Loaded) -> Outcome:
    """Run the plan; the result is also written to ``<output_dir>/metrics.json`` (``metrics``,
    and ``sweep`` / ``ema_sweep`` rows, ``bpd`` when asked)."""
    s = plan.score
    with together():  # a dataset one process cannot read stops all of them
        data = instantiate(plan.dataset)
    key = dataset_key(plan.dataset._target_, plan.dataset.get("path"))
    if s.extractor == "domain" or s.recognition:  # rank 0 trains a missing one, the others wait
        domain_weights(data, key, s.cache_dir, s.extractor_steps)
    with together():
        evaluator = Evaluator(
            data,
            key,
            s.cache_dir,
            extractor=s.extractor,
            split=s.split,
            inception_weights=s.inception_weights,
            metrics=list(s.metrics),
            extractor_steps=s.extractor_steps,
            device=plan.device,
            dinov2_weights=s.dinov2_weights,
        )
    outdir = plan.output_dir
    outdir.mkdir(parents=True, exist_ok=True)
    result: dict = {"dataset": evaluator.dataset, "split": s.split, "extractor": s.extractor}
    curves: list[Curve] = []
    if plan.images:
        images = load_images(plan.images, int(data.images.shape[-1]))
        result["images"] = plan.images
        result["metrics"] = evaluator.score_images(images) if s.metrics else {}
        if s.recognition:
            floats = images[:, : data.images.shape[1]].float() / 127.5 - 1.0
            with together():
                result["metrics"].update(recognition(plan, evaluator, data, floats, None))
        protocol = protocol_of(plan, evaluator, num_samples=images.shape[0], ckpt=plan.images)
    elif plan.ema_sweep:
        rows, x = ema_sweep(plan, loaded.ckpts, evaluator)
        best = min(rows, key=lambda r: r.get("fid", math.inf))
        result.update(ckpt=best["ckpt"], num_samples=s.num_samples, ema_sweep=rows)
        result["metrics"] = {
            k: v for k, v in best.items() if k not in ("ckpt", x) and not k.startswith("protocol.")
        }
        protocol = Protocol.from_row(best)
        curves.append(Curve("ema_sweep", "fid_vs_ema", rows, x, None))
    else:
        module, spec = loaded.module, loaded.spec
        ranges = s.seed_ranges
        gen = DiffusionGenerator.from_module(
            module, spec, plan.guidance, plan.use_ema, loaded.guide, plan.guidance_interval
        )
        result.update(ckpt=loaded.ckpts[0], sampler=spec.to_dict(), num_samples=s.num_samples)
        if plan.guide_ckpt:
            result["guide_ckpt"] = plan.guide_ckpt
        cache = feature_cache(plan, evaluator, loaded.ckpts[0], spec, plan.guide_ckpt)
        result["metrics"] = (
            evaluator.score_generator(
                gen, ranges, s.batch_size, plan.class_label, progress=True, cache=cache
            )
            if s.metrics
            else {}
        )
        if s.recognition:  # every process makes the same images (not shared out)
            with together():
                images, labels = generate_labelled(gen, ranges[0], s.batch_size, plan.class_label)
                result["metrics"].update(recognition(plan, evaluator, data, images, labels))
        protocol = protocol_of(plan, evaluator, module, spec, loaded.ckpts[0])
        if plan.guidance_sweep.weights:
            result["guidance_sweep"] = guidance_sweep(plan, loaded, evaluator, data, protocol)
            curves.append(
                Curve(
                    "guidance_sweep",
                    "fid_vs_guidance",
                    result["guidance_sweep"],
                    "guidance",
                    "guidance_interval",
                )
            )
        if loaded.sweep:
            result["sweep"] = nfe_sweep(plan, loaded, evaluator, protocol)
            curves.append(Curve("nfe_sweep", "fid_vs_nfe", result["sweep"], "nfe", "sampler"))
        if plan.bpd.num_images:  # every process computes the same (not shared out)
            with together():
                result["bpd"] = bits_per_dim(plan.bpd, module, data, s.split, plan.use_ema)
    if s.metrics or s.recognition:
        result["protocol"] = protocol.to_dict()
    with together():
        if is_main():
            if "protocol" in result:
                row = {**protocol.row(), **result["metrics"]}
                write_csv(outdir / "metrics.csv", list(row), [row])
            atomic_write_text(outdir / "metrics.json", json.dumps(result, indent=2))
            shutil.rmtree(outdir / FEATURES, ignore_errors=True)  # done: nothing to resume
            log.info("metrics: %s -> %s", result["metrics"], outdir / "metrics.json")
    return Outcome(result, curves)


def feature_cache(
    plan: EvaluationPlan,
    evaluator: Evaluator,
    ckpt: str,
    spec: SamplerSpec,
    guide_ckpt: str | None = None,
) -> FeatureCache:
    """Where the features of this checkpoint's samples are kept until the evaluation ends
    (``<output_dir>/generated_features/<hash of the settings>/``), so that a rerun into the same
    run directory continues an interrupted one instead of sampling again."""
    generation = {
        "ckpt": file_identity(ckpt),
        "guide_ckpt": file_identity(guide_ckpt),
        "use_ema": plan.use_ema,
        "sampler": spec.to_dict(),
        "guidance": plan.guidance,
        "guidance_interval": list(plan.guidance_interval) if plan.guidance_interval else None,
        "class_label": plan.class_label,
    }
    return evaluator.feature_cache(plan.output_dir / FEATURES, generation)


def recognition(
    plan: EvaluationPlan,
    evaluator: Evaluator,
    data: TensorImageDataset,
    images: Tensor,
    labels: Tensor | None,
) -> dict[str, float]:
    """Recognition metrics of ``images`` (in [-1, 1]) by the domain classifier against the
    held-out ``test`` split of ``data`` (evaluation/recognition.py); ``labels`` the requested
    classes (for ``class_accuracy``) or None."""
    s = plan.score
    ext = evaluator.extractor
    if s.extractor != "domain":
        ext = domain_extractor(data, evaluator.dataset, s.cache_dir, s.extractor_steps, plan.device)
    real = data.images[split_indices(len(data), "test")]
    return recognition_metrics(
        ext.net, images, real, ext.resolution, labels, s.recognition_threshold
    )


def nfe_sweep(
    plan: EvaluationPlan, loaded: Loaded, evaluator: Evaluator, protocol: Protocol
) -> list[dict]:
    """Metrics for every swept (sampler, grid, NFE) with the plan's seeds; writes nfe_sweep.csv,
    nfe_sweep.md and fid_vs_nfe.png (one line per sampler, or per sampler/grid when
    ``nfe_sweep.discretizations`` has several)."""
    rows = []
    several = len(plan.sweep.grids) > 1
    for spec in loaded.sweep:
        gen = DiffusionGenerator.from_module(
            loaded.module, spec, plan.guidance, plan.use_ema, loaded.guide, plan.guidance_interval
        )
        cache = feature_cache(plan, evaluator, loaded.ckpts[0], spec, plan.guide_ckpt)
        metrics = evaluator.score_generator(
            gen, plan.score.seed_ranges, plan.score.batch_size, plan.class_label, cache=cache
        )
        name = spec.name + (f"/{spec.discretization}" if several else "")
        row_protocol = protocol.with_sampling(spec, plan.guidance, plan.guidance_interval)
        rows.append({"sampler": name, "nfe": spec.nfe, **metrics, **row_protocol.row()})
        log.info("sweep %s nfe=%d: %s", name, spec.nfe, metrics)
    with together():
        if is_main():
            write_sweep_table(rows, plan.output_dir / "nfe_sweep")
            plot_fid_curve(rows, "nfe", "sampler", plan.output_dir / "fid_vs_nfe.png")
    return rows


def ema_length(module: DiffusionModule) -> tuple[str, float]:
    """The checkpoint's EMA length as (column, value): ``ema_halflife_kimg`` (EDM),
    ``ema_decay`` (plain) or ``ema_sigma_rel`` (power: its sampling profile, the first),
    from the training run's ``ema`` hyperparameters."""
    ema = module.hparams.ema
    if "sigma_rels" in ema:
        return "ema_sigma_rel", float(ema["sigma_rels"][0])
    for key in ("halflife_kimg", "decay"):
        if key in ema:
            return f"ema_{key}", float(ema[key])
    raise ConfigError(f"cannot read an EMA length from the checkpoint's ema config {dict(ema)}")


def ema_sweep(
    plan: EvaluationPlan, ckpts: list[str], evaluator: Evaluator
) -> tuple[list[dict], str]:
    """Metrics of each checkpoint (same sampler and seeds) by EMA length, and the EMA column's
    name; writes ema_sweep.csv, ema_sweep.md and fid_vs_ema.png. All checkpoints must use the
    same kind of EMA."""
    rows = []
    for ckpt in ckpts:
        with together():
            module = load_module(ckpt, plan.device)
            key, length = ema_length(module)
            if rows and key not in rows[0]:
                raise ConfigError(f"ckpt={ckpt!r} has {key}; the other checkpoints do not")
            spec = SamplerSpec.from_config(plan.sampler, ckpt=ckpt)
            gen = DiffusionGenerator.from_module(
                module, spec, plan.guidance, plan.use_ema, None, plan.guidance_interval
            )
        metrics = evaluator.score_generator(
            gen,
            plan.score.seed_ranges,
            plan.score.batch_size,
            plan.class_label,
            cache=feature_cache(plan, evaluator, ckpt, spec),
        )
        protocol = protocol_of(plan, evaluator, module, spec, ckpt)
        rows.append({"ckpt": ckpt, key: length, **metrics, **protocol.row()})
        log.info("%s %s=%g: %s", ckpt, key, length, metrics)
    rows.sort(key=lambda r: r[key])
    with together():
        if is_main():
            write_sweep_table(rows, plan.output_dir / "ema_sweep")
            plot_fid_curve(rows, key, None, plan.output_dir / "fid_vs_ema.png")
    return rows, key


def guidance_sweep(
    plan: EvaluationPlan,
    loaded: Loaded,
    evaluator: Evaluator,
    data: TensorImageDataset,
    protocol: Protocol,
) -> list[dict]:
    """Metrics (and with ``eval.recognition`` the class accuracy) for every guidance weight x
    interval of ``guidance_sweep.weights`` / ``guidance_sweep.intervals``, same seeds; writes
    guidance_sweep.csv / .md and fid_vs_guidance.png (one line per interval)."""
    rows = []
    s = plan.score
    for w, interval in plan.guidance_sweep.points:
        gen = DiffusionGenerator.from_module(
            loaded.module, loaded.spec, w, plan.use_ema, loaded.guide, interval
        )
        metrics = (
            evaluator.score_generator(gen, s.seed_ranges, s.batch_size, plan.class_label)
            if s.metrics
            else {}
        )
        if s.recognition:
            images, labels = generate_labelled(
                gen, s.seed_ranges[0], s.batch_size, plan.class_label
            )
            metrics.update(recognition(plan, evaluator, data, images, labels))
        label = interval_text(interval) or "all"
        row_protocol = protocol.with_sampling(loaded.spec, w, interval)
        rows.append({"guidance": w, "guidance_interval": label, **metrics, **row_protocol.row()})
        log.info("guidance %g interval %s: %s", w, label, metrics)
    with together():
        if is_main():
            write_sweep_table(rows, plan.output_dir / "guidance_sweep")
            if "fid" in rows[0]:
                plot_fid_curve(
                    rows, "guidance", "guidance_interval", plan.output_dir / "fid_vs_guidance.png"
                )
    return rows


def protocol_of(
    plan: EvaluationPlan,
    evaluator: Evaluator,
    module: DiffusionModule | None = None,
    spec: SamplerSpec | None = None,
    ckpt: str = "",
    num_samples: int | None = None,
) -> Protocol:
    """The protocol record of the plan's numbers for ``module`` sampled with ``spec`` (None: a
    folder of images, ``num_samples`` of them)."""
    s = plan.score
    if module is None:
        sampled: dict = {"ema": "", "class_sampling": "images folder"}
    else:
        sampled = sampling_fields(spec) | {
            "guidance": plan.guidance,
            "guidance_interval": interval_text(plan.guidance_interval),
            "guide_ckpt": plan.guide_ckpt or "",
            "ema": ema_text(module, plan.use_ema),
            "class_sampling": class_sampling(module, plan.class_label, spec),
        }
    return Protocol(
        dataset=evaluator.dataset,
        split=s.split,
        **evaluator.record(),
        num_samples=s.num_samples if num_samples is None else int(num_samples),
        repeats=s.repeats if module is not None else 1,
        seeds=seeds_text(s.seed_ranges) if module is not None else "",
        ckpt=str(ckpt),
        **sampled,
    )


def ema_text(module: DiffusionModule, use_ema: bool) -> str:
    """``ema_decay=0.999`` etc. for the sampled EMA, ``raw weights`` without it."""
    if not use_ema:
        return "raw weights"
    try:
        key, value = ema_length(module)
    except (ConfigError, AttributeError, TypeError):
        return "ema"
    return f"{key}={value:g}"


def class_sampling(module: DiffusionModule, class_label: int | None, spec: SamplerSpec) -> str:
    """How each sample's class was chosen: none, one fixed class, or uniformly from its seed."""
    if not module.label_dim:
        return "unconditional"
    if class_label is not None:
        return f"fixed class {int(class_label)}"
    return f"uniform per seed ({spec.noise} generator), {module.label_dim} classes"
