"""``dl-upsample ckpt=...``: super-resolution with an image-conditioned checkpoint (``cond=image``,
``experiment=sr_mnist``; docs/conditioning.md). One source of low-resolution images:

- ``inputs=<folder | zip | .npz>``: images of the model's input size (sample.py's npz too);
- ``base_ckpt=<ckpt>``: the two-stage cascade, the base model's samples for ``seeds`` upsampled;
- ``evaluate=true``: the reference split of the training data downsampled, with PSNR, domain FID /
  KID and the consistency error of the outputs and of bicubic upsampling in ``metrics.json``.

Writes ``<seed>.png`` per output, ``grid.png``, ``comparison.png`` (rows: input, bicubic,
model, and the truth with ``evaluate``) and with ``npz=true`` ``samples.npz``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from diffusionlab.checks import number, sampler_numbers
from diffusionlab.cli.common import plain, run_cli, user_errors_exit
from diffusionlab.config import CONF_DIR
from diffusionlab.data.datasets import split_indices
from diffusionlab.errors import ConfigError
from diffusionlab.evaluation.evaluator import Evaluator, dataset_key
from diffusionlab.evaluation.protocol import parse_seeds
from diffusionlab.evaluation.super_resolution import bicubic, fidelity_metrics
from diffusionlab.files import atomic_write_text
from diffusionlab.sampling.checkpoint import dataset_config, load_guide, load_module, pick_device
from diffusionlab.sampling.conditioning import LowResImages
from diffusionlab.sampling.generator import DiffusionGenerator
from diffusionlab.sampling.images import save_samples_png, to_uint8_rgb
from diffusionlab.sampling.spec import SamplerSpec
from diffusionlab.sampling.upsample import (
    CASCADE_SEED_OFFSET,
    check_base,
    generate_base,
    input_shape,
    read_inputs,
    sr_condition,
    upsample,
)
from diffusionlab.sampling.writer import SampleFolder
from diffusionlab.tracking.loggers import finish_wandb_run
from diffusionlab.tracking.wandb_runs import start_wandb_run

log = logging.getLogger(__name__)


def sr_generator(cfg: DictConfig, device: torch.device) -> DiffusionGenerator:
    """The upsampler of ``ckpt`` with the sampler, guidance and ``aug_sigma`` of ``cfg``."""
    module = load_module(cfg.ckpt, device)
    spec = SamplerSpec.from_config(cfg.sampler, ckpt=cfg.ckpt)
    spec.check(module.schedule)
    guide = load_guide(cfg.guide_ckpt, module)
    generator = DiffusionGenerator.from_module(
        module, spec, number(cfg, "guidance"), bool(cfg.use_ema), guide
    )
    condition = sr_condition(generator, f"ckpt={cfg.ckpt!r}")
    aug = number(cfg, "aug_sigma", at_least=0.0, optional=True)
    if aug is not None:
        generator.condition = LowResImages(condition.settings, aug)
    return generator


def sources(cfg: DictConfig) -> str:
    """Which one of inputs / base_ckpt / evaluate the job reads."""
    given = [k for k in ("inputs", "base_ckpt") if cfg.get(k)] + (
        ["evaluate"] if cfg.evaluate else []
    )
    if len(given) != 1:
        raise ConfigError(
            "give exactly one source of low-resolution images: inputs=<folder, zip or npz>, "
            f"base_ckpt=<ckpt> (cascade) or evaluate=true (held-out data); got {given or 'none'}"
        )
    return given[0]


def upsample_app(cfg: DictConfig) -> dict:
    """Run the job; returns what ``metrics.json`` holds."""
    source = sources(cfg)
    bs = number(cfg, "batch_size", int, at_least=1)
    sampler_numbers(cfg)
    device = pick_device(cfg.device)
    gen = sr_generator(cfg, device)
    factor = sr_condition(gen).settings.factor
    shape = input_shape(gen)
    truth = None
    result: dict = {"ckpt": str(cfg.ckpt), "source": source, "aug_sigma": gen.condition.aug_sigma}
    if source == "inputs":
        low = read_inputs(cfg.inputs, shape)
        seeds = parse_seeds(plain(cfg.seeds), low.shape[0])
        low = _match(low, seeds, "inputs")
    elif source == "base_ckpt":
        seeds = parse_seeds(plain(cfg.seeds), number(cfg, "num_samples", int, at_least=1))
        base = load_module(cfg.base_ckpt, device)
        spec = SamplerSpec.of(cfg.base_sampler or base.hparams.sampler)
        base_gen = DiffusionGenerator.from_module(base, spec)
        check_base(base_gen, gen)
        low = generate_base(base_gen, seeds, bs)
        seeds = [s + CASCADE_SEED_OFFSET for s in seeds]
    else:
        truth = reference_images(cfg)
        seeds = parse_seeds(plain(cfg.seeds), truth.shape[0])
        truth = _match(truth, seeds, "num_samples")
        low = sr_condition(gen).settings.lowres(truth)
    with finish_wandb_run():
        run = start_wandb_run(cfg, [str(cfg.ckpt)])
        x = upsample(gen, low, seeds, bs)
        result["num_images"] = x.shape[0]
        outdir = write_outputs(cfg, x, low, truth, seeds, factor)
        if source != "inputs":
            result |= score(cfg, x, low, truth, factor)
        atomic_write_text(outdir / "metrics.json", json.dumps(result, indent=2))
        log.info("%s", json.dumps(result))
        if cfg.grid:
            import wandb

            run.log({"upsample/comparison": wandb.Image(str(outdir / "comparison.png"))})
        run.summary.update(
            {f"upsample/{k}": v for k, v in _flat(result).items() if isinstance(v, float)}
        )
    return result


def reference_images(cfg: DictConfig) -> torch.Tensor:
    """The first ``num_samples`` high-resolution images of the reference split."""
    data = instantiate(dataset_config(cfg.get("dataset"), cfg.ckpt, cfg.paths))
    idx = split_indices(len(data), cfg.eval_split, "eval_split")
    n = min(int(number(cfg, "num_samples", int, at_least=1)), len(idx))
    return data.images[idx[:n]].float()


def score(
    cfg: DictConfig, x: torch.Tensor, low: torch.Tensor, truth: torch.Tensor | None, factor: int
) -> dict:
    """Fidelity (PSNR with the truth, consistency) and domain FID / KID of the outputs and of
    bicubic upsampling against the reference split."""
    dcfg = dataset_config(cfg.get("dataset"), cfg.ckpt, cfg.paths)
    data = instantiate(dcfg)
    if tuple(data.images.shape[1:]) != tuple(x.shape[1:]):
        raise ConfigError(
            f"dataset: the reference images are {list(data.images.shape[1:])}, the outputs "
            f"{list(x.shape[1:])}; pass dataset=<the high-resolution data>"
        )
    evaluator = Evaluator(
        data,
        dataset_key(dcfg._target_, dcfg.get("path")),
        cfg.cache_dir,
        split=cfg.eval_split,
        metrics=["fid", "kid"],
        extractor_steps=int(number(cfg, "extractor_steps", int, at_least=1)),
        device=x.device,
    )
    cubic = bicubic(low, factor)
    out = {}
    for name, images in (("model", x), ("bicubic", cubic)):
        metrics = fidelity_metrics(images, low, truth, factor)
        metrics |= evaluator.score_images(to_uint8_rgb(images)[:, :3])
        out[name] = metrics
    out["reference"] = {"dataset": evaluator.dataset, "split": cfg.eval_split}
    return out


def write_outputs(
    cfg: DictConfig,
    x: torch.Tensor,
    low: torch.Tensor,
    truth: torch.Tensor | None,
    seeds: list[int],
    factor: int,
) -> Path:
    outdir = Path(cfg.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    if cfg.png:
        SampleFolder(outdir, {}).write(seeds, x)
    if cfg.grid:
        save_samples_png(x[:256], outdir / "grid.png")
        k = min(16, x.shape[0])
        nearest = low[:k].repeat_interleave(factor, -1).repeat_interleave(factor, -2)
        rows = [nearest, bicubic(low[:k], factor), x[:k]] + (
            [truth[:k]] if truth is not None else []
        )
        save_samples_png(torch.cat(rows), outdir / "comparison.png", nrow=k, scale=2)
    if cfg.npz:
        u8 = lambda t: to_uint8_rgb(t)[:, : t.shape[1]].permute(0, 2, 3, 1).numpy()  # noqa: E731
        np.savez(outdir / "samples.npz", seeds=np.array(seeds), samples=u8(x), inputs=u8(low))
    log.info("%d upsampled images in %s", x.shape[0], outdir)
    return outdir


def _match(images: torch.Tensor, seeds: list[int], key: str) -> torch.Tensor:
    """The images for ``seeds`` (as many seeds as images, or fewer: the first ones)."""
    if len(seeds) > images.shape[0]:
        raise ConfigError(f"seeds: {len(seeds)} seeds for {images.shape[0]} images ({key})")
    return images[: len(seeds)]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}/")
        else:
            out[f"{prefix}{k}"] = v
    return out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="upsample")
@user_errors_exit
def app(cfg: DictConfig) -> None:
    upsample_app(cfg)


def main() -> None:
    """``dl-upsample``: user errors end as one ``error: ...`` line."""
    run_cli(app, "upsample")


if __name__ == "__main__":
    main()
