"""``python sample.py ckpt=...``: PNG per seed, a grid and optionally one npz (EDM generate.py);
the grid also goes to a W&B run attached to the checkpoint's training run. The sampler is the
checkpoint's own (``sampler=inherit``: what its training grids drew with), key by key overridable;
``from_run=<run>`` draws a training grid again from its record (seeds, labels, sampler, guidance
and guide), pixel for pixel. On N processes (torchrun, srun, submitit) each makes its share of the
seeds; a rerun into the same ``outdir`` skips the images already written (docs/scaling.md)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from diffusionlab.checks import number, sampler_numbers
from diffusionlab.cli.common import (
    log_file_per_process,
    plain,
    run_cli,
    share_run_directory,
    user_errors_exit,
)
from diffusionlab.config import CONF_DIR
from diffusionlab.diffusion.guidance import check_guidance_interval
from diffusionlab.distributed import (
    is_main,
    rank_and_world,
    start_processes,
    stop_processes,
    together,
)
from diffusionlab.errors import ConfigError
from diffusionlab.evaluation.protocol import parse_seeds
from diffusionlab.sampling.checkpoint import load_guide, load_module, pick_device
from diffusionlab.sampling.conditioning import condition_of
from diffusionlab.sampling.distributed import Tally, labels_of, write_samples
from diffusionlab.sampling.generator import DiffusionGenerator
from diffusionlab.sampling.grid_record import draw_grid, find_run_grid
from diffusionlab.sampling.images import save_samples_png
from diffusionlab.sampling.prompts import Prompt, check_negative, requested_prompts
from diffusionlab.sampling.spec import SamplerSpec, inherit_sampler
from diffusionlab.sampling.writer import SampleFolder, file_identity
from diffusionlab.stopping import Stopped, requeue_slurm_job, stop_signals
from diffusionlab.tracking.loggers import finish_wandb_run
from diffusionlab.tracking.wandb_runs import start_wandb_run
from diffusionlab.training.module import DiffusionModule

log = logging.getLogger(__name__)


def sample(cfg: DictConfig) -> Path:
    """Generate one image per seed into ``cfg.outdir``; returns the output directory. Every
    setting is checked first; the grid is then logged as ``samples/grid`` to a W&B run (job type
    sample), finished when this returns. With ``from_run``, a training grid drawn again
    (:func:`sample_run_grid`).

    Several processes (torchrun, srun, submitit) share the seeds; images already in ``outdir``
    (an interrupted run) are skipped; a stop signal ends every process within one batch."""
    if cfg.get("from_run"):
        return sample_run_grid(cfg)
    with stop_signals(), finish_wandb_run():
        start_processes()
        log_file_per_process()
        try:
            return _sample(cfg)
        except Stopped as e:
            requeued = requeue_slurm_job(e.signal) if is_main() else None
            raise (Stopped(e.signal, f"{e}; {requeued}") if requeued else e) from None


def _sample(cfg: DictConfig) -> Path:
    with together():  # a setting or file that one process cannot read stops all of them
        seeds = parse_seeds(plain(cfg.seeds), number(cfg, "num_samples", int, at_least=1))
        bs = number(cfg, "batch_size", int, at_least=1)
        guidance = number(cfg, "guidance")
        interval = check_guidance_interval(plain(cfg.get("guidance_interval")))
        sampler_numbers(cfg)
        device = pick_device(cfg.device)
        module = load_module(cfg.ckpt, device)
        spec = SamplerSpec.from_config(checkpoint_sampler(module, cfg.sampler), ckpt=cfg.ckpt)
        spec.check(module.schedule)
        guide = load_guide(cfg.guide_ckpt, module)
        negative = cfg.get("negative_prompt")
        generator = DiffusionGenerator.from_module(
            module, spec, guidance, bool(cfg.use_ema), guide, interval, negative
        )
        # text models: prompt= / prompts_file= (one grid row per prompt), negative_prompt=
        prompts = requested_prompts(generator.condition, cfg.get("prompt"), cfg.get("prompts_file"))
        check_negative(generator.condition, negative, guidance, guide is not None)
        if generator.condition is not None and not generator.condition.drawable:
            raise ConfigError(
                f"ckpt={cfg.ckpt!r} is image-conditioned: dl-upsample ckpt=... inputs=..."
            )
        class_label = number(cfg, "class_label", int, optional=True)
        if class_label is not None and not 0 <= class_label < module.label_dim:
            raise ConfigError(
                f"class_label={cfg.class_label} but the model has label_dim={module.label_dim}"
            )
        grid_labels = class_grid_labels(cfg, len(seeds), module.label_dim)
        images = len(module.data_shape) == 3
        record = _record(cfg, spec, guidance, interval, class_label, len(seeds), prompts)
        folder = SampleFolder(cfg.outdir, record)
        run = None
        if is_main():
            resumed = folder.check_record()
            folder.write_record()
            run = start_wandb_run(cfg, [str(cfg.ckpt)])
    world = rank_and_world()[1]
    keep = bool(cfg.png) and images
    log.info(
        "sampling %d seeds with %s (nfe=%s) on %d process%s into %s%s",
        len(seeds),
        spec.name,
        spec.nfe,
        world,
        "es" if world > 1 else "",
        folder.outdir,
        "" if keep else " (png=false: nothing is kept per seed, an interrupted run starts over)",
    )
    if is_main() and keep and resumed:
        log.info("resuming: images already in %s are skipped", folder.outdir)
    # a prompts file: every seed for each prompt, files p<row>_<seed>.png, a grid row each
    rows = prompts or [None]
    made = []
    for row, prompt in enumerate(rows):
        part = folder.part(f"p{row:03d}_" if len(rows) > 1 else "")
        value = class_label if prompt is None else prompt.text
        tally = write_samples(generator, seeds, part, bs, value, grid_labels, keep)
        made.append((part, value, tally))
        log.info(
            "%d samples%s (%s, nfe=%s) in %s: %s",
            len(seeds),
            "" if prompt is None else f" of {prompt.text!r}",
            spec.name,
            spec.nfe,
            folder.outdir,
            tally.summary(),
        )
    with together():
        if is_main():
            _finish(cfg, generator, seeds, made, grid_labels, bs, run)
    return folder.outdir


def _record(
    cfg: DictConfig,
    spec: SamplerSpec,
    guidance: float,
    interval: tuple[float, float] | None,
    class_label: int | None,
    n: int,
    prompts: list[Prompt] | None,
) -> dict:
    """Every setting an image depends on besides its seed (``sampling.json``)."""
    return {
        "ckpt": file_identity(cfg.ckpt),
        "guide_ckpt": file_identity(cfg.guide_ckpt),
        "use_ema": bool(cfg.use_ema),
        "sampler": spec.to_dict(),
        "guidance": float(guidance),
        "guidance_interval": list(interval) if interval else None,
        "class_label": class_label,
        "prompts": [p.text for p in prompts] if prompts else None,
        "negative_prompt": cfg.get("negative_prompt"),
        # a class grid gives seed i the class of its row, which depends on the number of seeds
        "class_grid": n if cfg.class_grid else None,
    }


def _finish(
    cfg: DictConfig,
    generator: DiffusionGenerator,
    seeds: list[int],
    made: list[tuple[SampleFolder, int | str | None, Tally]],
    grid_labels: torch.Tensor | None,
    bs: int,
    run,
) -> None:
    """Rank 0: the grid and the npz from every process's files (or the gathered samples) of
    every prompt row, and the grid to W&B."""
    folder = made[0][0]
    if cfg.grid:
        if len(made) > 1:  # one row of every seed per prompt
            nrow = len(seeds)
            x = torch.cat([_samples(part, tally, seeds) for part, _, tally in made])
        else:
            nrow = len(seeds) // generator.num_classes if grid_labels is not None else None
            x = _samples(folder, made[0][2], seeds if nrow else seeds[:256])
        folder.write_grid(x, nrow)
        if run is not None:
            import wandb

            run.log({"samples/grid": wandb.Image(str(folder.outdir / "grid.png"))})
    if cfg.npz:
        labels = [labels_of(generator, seeds, value, grid_labels, bs) for _, value, _ in made]
        label = None if labels[0] is None else torch.cat(labels)
        extra = {}
        if label is not None and generator.condition.kind == "text":  # each sample's prompt
            extra["prompts"] = np.array(generator.condition.describe(label))
        if len(made) == 1:
            folder.write_npz(seeds, made[0][2].samples, label, extra=extra)
        else:
            x = torch.cat([_samples(part, tally, seeds) for part, _, tally in made])
            folder.write_npz(seeds * len(made), x, label, extra=extra)


def _samples(part: SampleFolder, tally: Tally, seeds: list[int]) -> torch.Tensor:
    """The samples of ``seeds`` (the first of them) in [-1, 1], read back from the files (to
    the same bytes again) or gathered."""
    if tally.samples is None:
        return part.read(seeds).float() / 127.5 - 1
    return tally.samples[: len(seeds)]


def checkpoint_sampler(module: DiffusionModule, node: DictConfig | None) -> dict:
    """The sampler config of ``node`` over the checkpoint's own (its training run's ``sampler``,
    heun 35 NFE for NVlabs pickles): ``sampler=inherit`` keeps every key the node leaves null;
    another sampler's name starts from that sampler's defaults."""
    return inherit_sampler(module.hparams.get("sampler"), node)


def sample_run_grid(cfg: DictConfig) -> Path:
    """``from_run=<run folder>`` (its newest recorded grid whose checkpoint is kept; the
    autoguided one when there is one) or ``from_run=<run>/samples/step_XXXXXX[_autoguided].png``:
    the grid drawn again from its record with the checkpoint of its step, written as
    ``<outdir>/grid.png`` and compared byte for byte with the training PNG (equal on the same
    device type and thread count)."""
    for key in ("ckpt", "guide_ckpt", "seeds", "class_label"):
        if cfg.get(key) is not None:
            raise ConfigError(
                f"from_run={cfg.from_run} takes {key} from the grid's record: leave {key}=null"
            )
    grid = find_run_grid(cfg.from_run)
    record = grid.record
    module = load_module(str(grid.ckpt), pick_device(cfg.device))
    condition = condition_of(module)
    if condition is not None and not condition.drawable:
        raise ConfigError(
            f"from_run={cfg.from_run}: an image-conditioned model's grid upsampled training "
            "images, which its record does not hold; draw it with dl-upsample"
        )
    if record.channels_last:
        module = module.to(memory_format=torch.channels_last)
    guide = None
    if grid.guidance != 1.0:
        if grid.guide_ckpt is None or not grid.guide_ckpt.is_file():
            raise ConfigError(f"from_run={cfg.from_run}: the run's guide {grid.guide_ckpt} is gone")
        guide = load_guide(str(grid.guide_ckpt), module).ema
    spec = SamplerSpec.of(record.sampler)
    log.info(
        "%s: step %d, %d seeds from %d, %s nfe=%s, guidance %s, from %s",
        grid.image.name,
        record.step,
        len(record.seeds),
        record.seeds[0],
        spec.name,
        spec.nfe,
        grid.guidance,
        grid.ckpt,
    )
    with finish_wandb_run():
        run = start_wandb_run(cfg, [str(grid.ckpt)])
        x = draw_grid(
            module,
            record.seeds,
            record.labels,
            spec,
            guide,
            grid.guidance,
            record.guidance_interval,
        )
        outdir = Path(cfg.outdir)
        path = save_samples_png(x.cpu(), outdir / "grid.png")
        if path.read_bytes() == grid.image.read_bytes():
            log.info("%s is identical to %s", path, grid.image)
        else:
            log.warning(
                "%s differs from %s: drawn on another device type, thread count or library "
                "version than the training run",
                path,
                grid.image,
            )
        import wandb

        run.log({"samples/grid": wandb.Image(str(path))})
    return outdir


def class_grid_labels(cfg: DictConfig, n: int, label_dim: int) -> torch.Tensor | None:
    """With ``class_grid=true``: the label of each of the ``n`` images (``num_samples``), one row of
    ``n // label_dim`` images per class (class k in row k); None otherwise."""
    if not cfg.class_grid:
        return None
    if label_dim == 0:
        raise ConfigError("class_grid=true needs a class-conditional ckpt (label_dim > 0)")
    if cfg.class_label is not None:
        raise ConfigError("class_grid=true draws every class: leave class_label=null")
    if n % label_dim:
        raise ConfigError(
            f"class_grid=true: num_samples={n} images must be a multiple of "
            f"label_dim={label_dim} (e.g. num_samples={label_dim * 8})"
        )
    return torch.arange(n) // (n // label_dim)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
@user_errors_exit
def app(cfg: DictConfig) -> None:
    sample(cfg)


def main() -> None:
    """``sample.py`` / ``dl-sample``: user errors end as one ``error: ...`` line; ``seeds=0-9,20``
    is read as seeds, not as a sweep (cli/vocabulary.py)."""
    sys.argv = share_run_directory(sys.argv)
    try:
        run_cli(app, "sample")
    finally:
        stop_processes()


if __name__ == "__main__":
    main()
