"""``python evaluate.py ckpt=...`` or ``images=folder/``: FID / IS / KID / precision-recall against
a dataset's cached reference features, an optional NFE sweep (table + plot) and bits/dim;
``ckpt=[a.ckpt,b.ckpt]`` scores several checkpoints against their EMA length (table + plot), and
``ema_sweep.sigma_rels=[...]`` the post-hoc EMA lengths of one ``ema=power`` run.
Results also go to a W&B run attached to the checkpoint's training run."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusionlab.checks import number, sampler_numbers
from diffusionlab.cli.common import run_cli, user_errors_exit
from diffusionlab.cli.reconstruct_ema import sigma_rels
from diffusionlab.config import CONF_DIR
from diffusionlab.data.datasets import SPLITS, split_indices
from diffusionlab.diffusion.iddpm import vlb_bits_per_dim
from diffusionlab.diffusion.likelihood import image_bits_per_dim
from diffusionlab.diffusion.noise import StackedRandomGenerator
from diffusionlab.errors import ConfigError
from diffusionlab.evaluation.evaluator import Evaluator, dataset_key, domain_extractor
from diffusionlab.evaluation.images import load_images
from diffusionlab.evaluation.metrics import METRICS
from diffusionlab.evaluation.protocol import seed_ranges
from diffusionlab.evaluation.recognition import generate_labelled, recognition_metrics
from diffusionlab.evaluation.tables import markdown_lines, write_csv
from diffusionlab.sampling.checkpoint import dataset_config, load_guide, load_module, pick_device
from diffusionlab.sampling.generator import DiffusionGenerator, denoiser_of
from diffusionlab.sampling.images import to_uint8_rgb
from diffusionlab.sampling.spec import SamplerSpec
from diffusionlab.tracking.loggers import finish_wandb_run
from diffusionlab.tracking.wandb_runs import log_curve, start_wandb_run
from diffusionlab.training.ema_snapshots import SNAPSHOT_FOLDER, write_reconstructions

log = logging.getLogger(__name__)


def checkpoints(cfg: DictConfig) -> list[str]:
    """``ckpt`` as a list: ``[]`` (none), ``[path]`` or the paths of ``ckpt=[a,b]``."""
    if isinstance(cfg.ckpt, ListConfig):
        return [str(c) for c in cfg.ckpt]
    return [str(cfg.ckpt)] if cfg.ckpt else []


def ema_length(module) -> tuple[str, float]:
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


def reconstructed_checkpoints(cfg: DictConfig, ckpts: list[str]) -> list[str]:
    """With ``ema_sweep.sigma_rels``: the single ``ckpt``'s EMA rebuilt at each length from its
    run's snapshots (``<run>/ema_snapshots`` or ``ema_sweep.snapshots``) into
    ``<output_dir>/ema_reconstructed/``; else ``ckpts`` unchanged."""
    if not cfg.ema_sweep.sigma_rels:
        return ckpts
    if len(ckpts) != 1:
        raise ConfigError(
            "ema_sweep.sigma_rels needs one ckpt=<run>/checkpoints/last.ckpt of an ema=power run"
        )
    snapshots = cfg.ema_sweep.snapshots or Path(ckpts[0]).resolve().parents[1] / SNAPSHOT_FOLDER
    paths = write_reconstructions(
        ckpts[0],
        snapshots,
        sigma_rels(cfg, "ema_sweep.sigma_rels"),
        Path(cfg.paths.output_dir) / "ema_reconstructed",
        keys=("ckpt", "ema_sweep.snapshots", "ema_sweep.sigma_rels"),
    )
    return [str(p) for p in paths]


def evaluate(cfg: DictConfig) -> dict:
    """Run the evaluation described by ``cfg``; writes ``metrics.json`` to the run directory and
    logs ``eval/<metric>`` and the sweep tables to a W&B run (finished when this returns)."""
    ckpts = checkpoints(cfg)
    if bool(ckpts) == bool(cfg.images):
        raise ConfigError("pass exactly one of ckpt=... or images=...")
    if cfg.bpd.get("method", "ode") not in ("ode", "vlb"):
        raise ConfigError(f"bpd.method={cfg.bpd.method!r} must be ode or vlb")
    scored = reconstructed_checkpoints(cfg, ckpts) if ckpts else ckpts
    if len(scored) > 1 and (cfg.sweep.samplers or cfg.bpd.num_images or cfg.guide_ckpt):
        raise ConfigError(
            "sweep.samplers, bpd.num_images and guide_ckpt need a single ckpt (no list, no ema_sweep)"
        )
    number(cfg, "eval.num_samples", int, at_least=2)  # FID needs a covariance
    for key in ("eval.repeats", "eval.batch_size"):
        number(cfg, key, int, at_least=1)
    metrics = OmegaConf.to_container(cfg.eval, resolve=True).get("metrics")
    recognition = bool(cfg.eval.get("recognition", False))
    if not isinstance(metrics, list) or not set(metrics) <= set(METRICS):
        raise ConfigError(f"eval.metrics={metrics!r} must be a list drawn from {list(METRICS)}")
    if not metrics and not recognition:
        raise ConfigError("eval.metrics=[] and eval.recognition=false: nothing to evaluate")
    if not metrics and (len(scored) > 1 or cfg.sweep.samplers):
        raise ConfigError("eval.metrics=[]: the FID sweeps (ckpt list, sweep.samplers) need FID")
    if recognition:
        number(cfg, "eval.recognition_threshold", above=0.0)
    if cfg.eval.split not in SPLITS:
        raise ConfigError(f"eval.split={cfg.eval.split!r} must be all, train or test")
    number(cfg, "guidance")
    sampler_numbers(cfg)
    device = pick_device(cfg.device)
    ckpt = ckpts[0] if ckpts else None
    dcfg = dataset_config(cfg.get("dataset"), ckpt, cfg.paths)
    # a single checkpoint is read and checked before anything is logged
    module = load_module(ckpts[0], device) if len(scored) == 1 else None
    guide = load_guide(cfg.guide_ckpt, module) if module is not None else None
    sampler = SamplerSpec.from_config(cfg.sampler, ckpt=ckpts[0]) if module is not None else None
    if module is not None:
        if cfg.bpd.num_images and module.decoder is not None:
            raise ConfigError(
                "bpd.num_images: bits/dim needs a pixel-space model, not a latent one"
            )
        sampler.check(module.schedule)
        if cfg.bpd.num_images and cfg.bpd.get("method", "ode") == "vlb":
            param = module.denoiser.parameterization
            if not (param.learned_variance and module.schedule.discrete):
                raise ConfigError(
                    "bpd.method=vlb needs a model trained on a discrete schedule with "
                    f"parameterization.learned_variance=true (ckpt has {param}, {module.schedule})"
                )
        for swept in sweep_samplers(cfg, ckpts[0]):
            swept.check(module.schedule, "sweep.samplers")
    with finish_wandb_run():
        run = start_wandb_run(cfg, ckpts)
        result = _evaluate(cfg, dcfg, scored, module, sampler, device, run, guide)
        run.log({f"eval/{k}": v for k, v in {**result["metrics"], **result.get("bpd", {})}.items()})
    return result


def _evaluate(
    cfg: DictConfig,
    dcfg: DictConfig,
    ckpts: list[str],
    module,
    sampler: SamplerSpec | None,
    device,
    run,
    guide=None,
) -> dict:
    data = instantiate(dcfg)
    e = cfg.eval
    evaluator = Evaluator(
        data,
        dataset_key(dcfg._target_, dcfg.get("path")),
        e.cache_dir,
        extractor=e.extractor,
        split=e.split,
        inception_weights=e.inception_weights,
        metrics=list(e.metrics),
        extractor_steps=e.extractor_steps,
        device=device,
    )
    outdir = Path(cfg.paths.output_dir)
    outdir.mkdir(parents=True, exist_ok=True)
    result: dict = {"dataset": evaluator.dataset, "split": e.split, "extractor": e.extractor}
    if cfg.images:
        images = load_images(cfg.images, int(data.images.shape[-1]))
        result["images"] = str(cfg.images)
        result["metrics"] = evaluator.score_images(images) if e.metrics else {}
        if e.get("recognition", False):
            floats = images[:, : data.images.shape[1]].float() / 127.5 - 1.0
            result["metrics"].update(recognition(cfg, evaluator, data, floats, None))
    elif len(ckpts) > 1 or cfg.ema_sweep.sigma_rels:
        rows, x = ema_sweep(cfg, ckpts, evaluator, device, outdir)
        best = min(rows, key=lambda r: r.get("fid", math.inf))
        result.update(ckpt=best["ckpt"], num_samples=int(e.num_samples), ema_sweep=rows)
        result["metrics"] = {k: v for k, v in best.items() if k not in ("ckpt", x)}
        log_curve(run, "eval/ema_sweep", "eval/fid_vs_ema", rows, x, None)
    else:
        ranges = seed_ranges(int(e.num_samples), int(e.repeats), int(e.first_seed))
        gen = DiffusionGenerator.from_module(
            module, sampler, float(cfg.guidance), bool(cfg.use_ema), guide
        )
        result.update(ckpt=ckpts[0], sampler=sampler.to_dict(), num_samples=int(e.num_samples))
        if cfg.guide_ckpt:
            result["guide_ckpt"] = str(cfg.guide_ckpt)
        result["metrics"] = (
            evaluator.score_generator(
                gen, ranges, int(e.batch_size), cfg.class_label, progress=True
            )
            if e.metrics
            else {}
        )
        if e.get("recognition", False):
            images, labels = generate_labelled(gen, ranges[0], int(e.batch_size), cfg.class_label)
            result["metrics"].update(recognition(cfg, evaluator, data, images, labels))
        if cfg.sweep.samplers:
            result["sweep"] = nfe_sweep(cfg, module, evaluator, ranges, outdir, guide)
            log_curve(run, "eval/nfe_sweep", "eval/fid_vs_nfe", result["sweep"], "nfe", "sampler")
        if cfg.bpd.num_images:
            result["bpd"] = bits_per_dim(cfg, module, data, e.split)
    (outdir / "metrics.json").write_text(json.dumps(result, indent=2))
    log.info("metrics: %s -> %s", result["metrics"], outdir / "metrics.json")
    return result


def recognition(
    cfg: DictConfig, evaluator: Evaluator, data, images: torch.Tensor, labels
) -> dict[str, float]:
    """Recognition metrics of ``images`` (in [-1, 1]) by the domain classifier against the
    held-out ``test`` split of ``data`` (evaluation/recognition.py); ``labels`` the requested
    classes (for ``class_accuracy``) or None."""
    e = cfg.eval
    ext = evaluator.extractor
    if e.extractor != "domain":
        ext = domain_extractor(
            data, evaluator.dataset, e.cache_dir, e.extractor_steps, evaluator.device
        )
    real = data.images[split_indices(len(data), "test")]
    return recognition_metrics(
        ext.net, images, real, ext.resolution, labels, float(e.recognition_threshold)
    )


def sweep_samplers(cfg: DictConfig, ckpt: str) -> list[SamplerSpec]:
    """The swept sampler configs: every sampler x grid (``sweep.grids``, default the sampler's
    discretization; ``learned`` reads the grids fitted beside ``ckpt``) x NFE."""
    grids = list(cfg.sweep.get("grids") or [cfg.sampler.discretization])
    return [
        SamplerSpec.from_config(
            {"name": name, "nfe": int(nfe), "discretization": grid}, ckpt=ckpt, key="sweep"
        )
        for name in cfg.sweep.samplers
        for grid in grids
        for nfe in cfg.sweep.nfe
    ]


def nfe_sweep(
    cfg: DictConfig, module, evaluator: Evaluator, ranges, outdir: Path, guide=None
) -> list[dict]:
    """Metrics for every (sampler, grid, NFE); writes nfe_sweep.csv, nfe_sweep.md and
    fid_vs_nfe.png (one line per sampler, or per sampler/grid when ``sweep.grids`` has several)."""
    rows = []
    several = len(cfg.sweep.get("grids") or []) > 1
    for sampler in sweep_samplers(cfg, str(cfg.ckpt)):
        gen = DiffusionGenerator.from_module(
            module, sampler, float(cfg.guidance), bool(cfg.use_ema), guide
        )
        metrics = evaluator.score_generator(gen, ranges, int(cfg.eval.batch_size), cfg.class_label)
        name = sampler.name + (f"/{sampler.discretization}" if several else "")
        rows.append({"sampler": name, "nfe": sampler.nfe, **metrics})
        log.info("sweep %s nfe=%d: %s", name, sampler.nfe, metrics)
    _write_table(rows, outdir / "nfe_sweep")
    _plot_sweep(rows, "nfe", "sampler", outdir / "fid_vs_nfe.png")
    return rows


def ema_sweep(
    cfg: DictConfig, ckpts: list[str], evaluator: Evaluator, device, outdir: Path
) -> tuple[list[dict], str]:
    """Metrics of each checkpoint (same sampler and seeds) by EMA length, and the EMA column's
    name; writes ema_sweep.csv, ema_sweep.md and fid_vs_ema.png. All checkpoints must use the
    same kind of EMA."""
    e = cfg.eval
    ranges = seed_ranges(int(e.num_samples), int(e.repeats), int(e.first_seed))
    rows = []
    for ckpt in ckpts:
        module = load_module(ckpt, device)
        key, length = ema_length(module)
        if rows and key not in rows[0]:
            raise ConfigError(f"ckpt={ckpt!r} has {key}; the other checkpoints do not")
        spec = SamplerSpec.from_config(cfg.sampler, ckpt=ckpt)
        gen = DiffusionGenerator.from_module(module, spec, float(cfg.guidance), bool(cfg.use_ema))
        metrics = evaluator.score_generator(gen, ranges, int(e.batch_size), cfg.class_label)
        rows.append({"ckpt": ckpt, key: length, **metrics})
        log.info("%s %s=%g: %s", ckpt, key, length, metrics)
    rows.sort(key=lambda r: r[key])
    _write_table(rows, outdir / "ema_sweep")
    _plot_sweep(rows, key, None, outdir / "fid_vs_ema.png")
    return rows, key


def _write_table(rows: list[dict], stem: Path) -> None:
    """``<stem>.csv`` and a Markdown ``<stem>.md`` (per-run metrics, plus FID's min / mean / max
    over seed ranges when repeated)."""
    write_csv(stem.with_suffix(".csv"), list(rows[0]), rows)
    spread = {f"{k}_{s}" for k in rows[0] for s in ("min", "mean", "max") if f"{k}_min" in rows[0]}
    keys = [k for k in rows[0] if k not in spread or k.startswith("fid_")]
    stem.with_suffix(".md").write_text("\n".join(markdown_lines(keys, rows)) + "\n")


def _plot_sweep(rows: list[dict], x: str, series: str | None, path: Path) -> None:
    """FID against ``x`` on log-log axes, one line per value of ``series``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for name in dict.fromkeys(r[series] if series else None for r in rows):
        pts = [(r[x], r["fid"]) for r in rows if series is None or r[series] == name]
        ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE" if x == "nfe" else x)
    ax.set_ylabel("FID")
    if series:
        ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def bits_per_dim(cfg: DictConfig, module, data, split: str) -> dict[str, float]:
    """Mean bits/dim of the first ``bpd.num_images`` images of ``split`` under the EMA model:
    ``bpd.method=ode`` through the probability-flow ODE, ``vlb`` by the variational bound."""
    denoiser = denoiser_of(module, bool(cfg.use_ema))
    idx = split_indices(len(data), split)[: int(cfg.bpd.num_images)]
    images = to_uint8_rgb(data.images[idx])[:, : data.images.shape[1]]
    labels = module.one_hot(data.labels[idx].to(module.device)) if module.label_dim else None
    if cfg.bpd.get("method", "ode") == "vlb":
        return vlb_bits_per_dim_of(cfg, denoiser, module, images, labels)
    gen = torch.Generator().manual_seed(0)
    bpds, nfes = [], []
    bs = int(cfg.bpd.batch_size)
    for s in range(0, images.shape[0], bs):
        lab = labels[s : s + bs] if labels is not None else None

        def denoise(x, sigma, lab=lab):
            return denoiser(x, sigma, class_labels=lab)

        bpd, nfe = image_bits_per_dim(
            denoise,
            images[s : s + bs].to(module.device),
            gen,
            divergence=cfg.bpd.divergence,
            rtol=float(cfg.bpd.tolerance),
            atol=float(cfg.bpd.tolerance),
            sigma_min=module.schedule.sigma_min,
            sigma_max=module.schedule.sigma_max,
        )
        bpds.append(bpd.cpu())
        nfes.append(nfe)
    bpd = torch.cat(bpds)
    return {
        "bpd": bpd.mean().item(),
        "bpd_stderr": (bpd.std() / len(bpd) ** 0.5).item(),
        "nfe_mean": float(np.mean(nfes)),
    }


def vlb_bits_per_dim_of(cfg: DictConfig, denoiser, module, images, labels) -> dict[str, float]:
    """iDDPM's bound (diffusion/iddpm.py) on 8-bit ``images``, T NFE per batch; the noise of
    image i comes from seed i, whatever the batch size."""
    x0 = images.to(module.device).float() / 127.5 - 1
    bs = int(cfg.bpd.batch_size)
    bpds, priors = [], []
    for s in range(0, x0.shape[0], bs):
        lab = labels[s : s + bs] if labels is not None else None
        gen = StackedRandomGenerator(range(s, min(s + bs, x0.shape[0])), device=module.device)

        def denoise(x, sigma, lab=lab):
            return denoiser.forward_with_variance(x, sigma, class_labels=lab)

        out = vlb_bits_per_dim(denoise, x0[s : s + bs], module.schedule, gen)
        bpds.append(out["bpd"].cpu())
        priors.append(out["prior"].cpu())
    bpd = torch.cat(bpds)
    return {
        "bpd": bpd.mean().item(),
        "bpd_stderr": (bpd.std() / len(bpd) ** 0.5).item(),
        "bpd_prior": torch.cat(priors).mean().item(),
        "nfe_mean": float(module.schedule.t_max + 1),
    }


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
@user_errors_exit
def app(cfg: DictConfig) -> float | None:
    return evaluate(cfg)["metrics"].get("fid")


def main() -> None:
    """``evaluate.py`` / ``dl-evaluate``: user errors end as one ``error: ...`` line."""
    run_cli(app)


if __name__ == "__main__":
    main()
