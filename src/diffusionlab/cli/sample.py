"""``python sample.py ckpt=...``: PNG per seed, a grid and optionally one npz (EDM generate.py);
the grid also goes to a W&B run attached to the checkpoint's training run."""

from __future__ import annotations

import logging
import sys
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
from diffusionlab.sampling.images import save_samples_png, to_uint8_rgb
from diffusionlab.sampling.prompts import Prompt, check_negative, requested_prompts
from diffusionlab.sampling.spec import SamplerSpec
from diffusionlab.tracking.loggers import finish_wandb_run
from diffusionlab.tracking.wandb_runs import start_wandb_run

log = logging.getLogger(__name__)


def sample(cfg: DictConfig) -> Path:
    """Generate one image per seed into ``cfg.outdir``; returns the output directory. Every
    setting is checked first; the grid is then logged as ``samples/grid`` to a W&B run (job type
    sample), finished when this returns."""
    seeds = parse_seeds(_plain(cfg.seeds), number(cfg, "n", int, at_least=1))
    bs = number(cfg, "batch_size", int, at_least=1)
    guidance = number(cfg, "guidance")
    sampler_numbers(cfg)
    device = pick_device(cfg.device)
    module = load_module(cfg.ckpt, device)
    spec = SamplerSpec.from_config(cfg.sampler, ckpt=cfg.ckpt)
    spec.check(module.schedule)
    guide = load_guide(cfg.guide_ckpt, module)
    negative = cfg.get("negative_prompt")
    generator = DiffusionGenerator.from_module(
        module, spec, guidance, bool(cfg.use_ema), guide, negative
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
    with finish_wandb_run():
        run = start_wandb_run(cfg, [str(cfg.ckpt)])
        outdir = _sample(cfg, generator, seeds, bs, grid_labels, prompts)
        if cfg.grid:
            import wandb

            run.log({"samples/grid": wandb.Image(str(outdir / "grid.png"))})
    return outdir


def class_grid_labels(cfg: DictConfig, n: int, label_dim: int) -> torch.Tensor | None:
    """With ``class_grid=true``: the label of each of the ``n`` images, one row of
    ``n // label_dim`` images per class (class k in row k); None otherwise."""
    if not cfg.class_grid:
        return None
    if label_dim == 0:
        raise ConfigError("class_grid=true needs a class-conditional ckpt (label_dim > 0)")
    if cfg.class_label is not None:
        raise ConfigError("class_grid=true draws every class: leave class_label=null")
    if n % label_dim:
        raise ConfigError(
            f"class_grid=true: n={n} images must be a multiple of label_dim={label_dim} "
            f"(e.g. n={label_dim * 8})"
        )
    return torch.arange(n) // (n // label_dim)


def _sample(
    cfg: DictConfig,
    generator: DiffusionGenerator,
    seeds: list[int],
    bs: int,
    grid_labels: torch.Tensor | None = None,
    prompts: list[Prompt] | None = None,
) -> Path:
    outdir = Path(cfg.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    images, labels = [], []
    rows = prompts or [None]  # a prompts file: every seed for each prompt, a grid row each
    for row, prompt in enumerate(rows):
        value = cfg.class_label if prompt is None else prompt.text
        prefix = f"p{row:03d}_" if len(rows) > 1 else ""
        for start in tqdm(range(0, len(seeds), bs), desc="sampling", unit="batch"):
            batch = seeds[start : start + bs]
            if grid_labels is None:
                noise, lab, gen = generator.seeded_inputs(batch, value)
            else:  # a fixed label draws nothing from the per-seed generators; then the grid's
                noise, _, gen = generator.seeded_inputs(batch, 0)
                lab = grid_labels[start : start + bs].to(noise.device)
            x = generator.sample_images(noise, lab, gen).cpu()
            images.append(x)
            if lab is not None:
                labels.append(lab.cpu())
            if cfg.png and x.ndim == 4:
                _write_pngs(x, batch, outdir, prefix)
    x = torch.cat(images)
    if cfg.grid:
        nrow = len(seeds) // generator.num_classes if grid_labels is not None else None
        nrow = len(seeds) if len(rows) > 1 else nrow
        save_samples_png(x if nrow else x[:256], outdir / "grid.png", nrow)
    if cfg.npz:
        arrays = {"seeds": np.array(seeds * len(rows))}
        arrays["samples"] = (
            to_uint8_rgb(x)[:, : x.shape[1]].permute(0, 2, 3, 1).numpy()
            if x.ndim == 4
            else x.numpy()
        )
        if labels:
            arrays["labels"] = torch.cat(labels).numpy()
            if generator.condition.kind == "text":  # the prompt of each sample
                arrays["prompts"] = np.array(generator.condition.describe(torch.cat(labels)))
        np.savez(outdir / "samples.npz", **arrays)
    spec = generator.spec
    log.info("%d samples (%s, nfe=%s) in %s", len(x), spec.name, spec.nfe, outdir)
    return outdir


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _write_pngs(x: torch.Tensor, seeds: list[int], outdir: Path, prefix: str = "") -> None:
    from PIL import Image

    arr = to_uint8_rgb(x)[:, : x.shape[1]].permute(0, 2, 3, 1).numpy()
    for seed, img in zip(seeds, arr, strict=True):
        image = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
        image.save(outdir / f"{prefix}{seed:06d}.png")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
@user_errors_exit
def app(cfg: DictConfig) -> None:
    sample(cfg)


def quote_seeds(argv: list[str]) -> list[str]:
    """``seeds=0-9,20`` as the docs write it: quoted, so Hydra does not read it as a sweep
    (left alone under ``-m``/``--multirun``, where a comma list is a sweep)."""
    if "-m" in argv or "--multirun" in argv:
        return argv
    return [
        f"seeds='{a[6:]}'" if a.startswith("seeds=") and "," in a and a[6:7] not in "['\"" else a
        for a in argv
    ]


def main() -> None:
    """``sample.py`` / ``dl-sample``: user errors end as one ``error: ...`` line."""
    sys.argv = quote_seeds(sys.argv)
    run_cli(app)


if __name__ == "__main__":
    main()
