"""``python sample.py ckpt=...``: PNG per seed, a grid and optionally one npz (EDM generate.py);
the grid also goes to a W&B run attached to the checkpoint's training run. The sampler is the
checkpoint's own (``sampler=inherit``: what its training grids drew with), key by key overridable;
``from_run=<run>`` draws a training grid again from its record (seeds, labels, sampler, guidance
and guide), pixel for pixel."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from diffusionlab.checks import number, sampler_numbers
from diffusionlab.cli.common import run_cli, user_errors_exit
from diffusionlab.config import CONF_DIR
from diffusionlab.errors import ConfigError
from diffusionlab.evaluation.protocol import parse_seeds
from diffusionlab.sampling.checkpoint import load_guide, load_module, pick_device
from diffusionlab.sampling.generator import DiffusionGenerator
from diffusionlab.sampling.grid_record import draw_grid, find_run_grid
from diffusionlab.sampling.images import save_samples_png, to_uint8_rgb
from diffusionlab.sampling.spec import SamplerSpec, inherit_sampler
from diffusionlab.tracking.loggers import finish_wandb_run
from diffusionlab.tracking.wandb_runs import start_wandb_run
from diffusionlab.training.module import DiffusionModule

log = logging.getLogger(__name__)


def sample(cfg: DictConfig) -> Path:
    """Generate one image per seed into ``cfg.outdir``; returns the output directory. Every
    setting is checked first; the grid is then logged as ``samples/grid`` to a W&B run (job type
    sample), finished when this returns. With ``from_run``, a training grid drawn again
    (:func:`sample_run_grid`)."""
    if cfg.get("from_run"):
        return sample_run_grid(cfg)
    seeds = parse_seeds(_plain(cfg.seeds), number(cfg, "num_samples", int, at_least=1))
    bs = number(cfg, "batch_size", int, at_least=1)
    guidance = number(cfg, "guidance")
    sampler_numbers(cfg)
    device = pick_device(cfg.device)
    module = load_module(cfg.ckpt, device)
    spec = SamplerSpec.from_config(checkpoint_sampler(module, cfg.sampler), ckpt=cfg.ckpt)
    spec.check(module.schedule)
    guide = load_guide(cfg.guide_ckpt, module)
    generator = DiffusionGenerator.from_module(module, spec, guidance, bool(cfg.use_ema), guide)
    class_label = number(cfg, "class_label", int, optional=True)
    if class_label is not None and not 0 <= class_label < module.label_dim:
        raise ConfigError(
            f"class_label={cfg.class_label} but the model has label_dim={module.label_dim}"
        )
    grid_labels = class_grid_labels(cfg, len(seeds), module.label_dim)
    with finish_wandb_run():
        run = start_wandb_run(cfg, [str(cfg.ckpt)])
        outdir = _sample(cfg, generator, seeds, bs, grid_labels)
        if cfg.grid:
            import wandb

            run.log({"samples/grid": wandb.Image(str(outdir / "grid.png"))})
    return outdir


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
        x = draw_grid(module, record.seeds, record.labels, spec, guide, grid.guidance)
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


def _sample(
    cfg: DictConfig,
    generator: DiffusionGenerator,
    seeds: list[int],
    bs: int,
    grid_labels: torch.Tensor | None = None,
) -> Path:
    outdir = Path(cfg.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    images, labels = [], []
    for start in tqdm(range(0, len(seeds), bs), desc="sampling", unit="batch"):
        batch = seeds[start : start + bs]
        if grid_labels is None:
            noise, lab, gen = generator.seeded_inputs(batch, cfg.class_label)
        else:  # a fixed label draws nothing from the per-seed generators; then the grid's labels
            noise, _, gen = generator.seeded_inputs(batch, 0)
            lab = grid_labels[start : start + bs].to(noise.device)
        x = generator.sample_images(noise, lab, gen).cpu()
        images.append(x)
        if lab is not None:
            labels.append(lab.cpu())
        if cfg.png and x.ndim == 4:
            _write_pngs(x, batch, outdir)
    x = torch.cat(images)
    if cfg.grid:
        nrow = len(seeds) // generator.num_classes if grid_labels is not None else None
        save_samples_png(x if nrow else x[:256], outdir / "grid.png", nrow)
    if cfg.npz:
        arrays = {"seeds": np.array(seeds)}
        arrays["samples"] = (
            to_uint8_rgb(x)[:, : x.shape[1]].permute(0, 2, 3, 1).numpy()
            if x.ndim == 4
            else x.numpy()
        )
        if labels:
            arrays["labels"] = torch.cat(labels).numpy()
        np.savez(outdir / "samples.npz", **arrays)
    spec = generator.spec
    log.info("%d samples (%s, nfe=%s) in %s", len(seeds), spec.name, spec.nfe, outdir)
    return outdir


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _write_pngs(x: torch.Tensor, seeds: list[int], outdir: Path) -> None:
    from PIL import Image

    arr = to_uint8_rgb(x)[:, : x.shape[1]].permute(0, 2, 3, 1).numpy()
    for seed, img in zip(seeds, arr, strict=True):
        Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(outdir / f"{seed:06d}.png")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
@user_errors_exit
def app(cfg: DictConfig) -> None:
    sample(cfg)


def main() -> None:
    """``sample.py`` / ``dl-sample``: user errors end as one ``error: ...`` line; ``seeds=0-9,20``
    is read as seeds, not as a sweep (cli/vocabulary.py)."""
    run_cli(app, "sample")


if __name__ == "__main__":
    main()
