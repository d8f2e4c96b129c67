"""``dl-fit-sigmas ckpt=... sampler=dpmpp_2m sampler.nfe=10``: fit the sampler's sigma grid to the
checkpoint's EMA denoiser at that NFE (:func:`~diffusionlab.diffusion.grid_fit.fit_discretization`)
and store it beside the checkpoint, where ``sampler.discretization=learned`` finds it."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from diffusionlab.checks import number, sampler_numbers
from diffusionlab.cli.common import run_cli, user_errors_exit
from diffusionlab.cli.vocabulary import warn_old_command
from diffusionlab.config import CONF_DIR
from diffusionlab.diffusion.grid_fit import GridFit, GridFitSettings, fit_discretization
from diffusionlab.diffusion.learned_grids import grid_path, save_grid
from diffusionlab.diffusion.samplers import get_sampler
from diffusionlab.errors import ConfigError
from diffusionlab.sampling.checkpoint import load_module, pick_device
from diffusionlab.sampling.generator import DiffusionGenerator, denoiser_of
from diffusionlab.sampling.spec import SamplerSpec
from diffusionlab.stopping import Stopped, stop_signals

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def fit_grid(cfg: DictConfig) -> tuple[Path, GridFit]:
    """Fit and store the grid; returns the file written and the fit. A stop signal ends the fit
    within one network evaluation, before anything is written."""
    with stop_signals():
        try:
            return _fit_grid(cfg)
        except Stopped as e:
            raise e.because(
                f"stopped fitting the grid of sampler={cfg.sampler.name} nfe={cfg.sampler.nfe}; "
                "nothing was written (a fit starts from fit.init): the same command fits it again"
            ) from None


def _fit_grid(cfg: DictConfig) -> tuple[Path, GridFit]:
    sampler_numbers(cfg)
    sizes = ("teacher_nfe", "num_samples", "num_validation", "num_heldout", "batch_size")
    for key in (*sizes, "eval_batch_size"):
        number(cfg, f"fit.{key}", int, at_least=1)
    number(cfg, "fit.steps", int, at_least=0)
    number(cfg, "fit.eval_every", int, at_least=1)
    number(cfg, "fit.lr", above=0)
    number(cfg, "fit.radius", at_least=0)
    if cfg.fit.dtype not in DTYPES:
        raise ConfigError(f"fit.dtype={cfg.fit.dtype!r} must be one of {', '.join(DTYPES)}")
    if cfg.sampler.discretization == "learned":
        raise ConfigError("sampler.discretization=learned: the fit starts from fit.init instead")
    spec = SamplerSpec.from_config(cfg.sampler)
    name, nfe = spec.name, spec.nfe
    try:
        smp, teacher = spec.sampler(), get_sampler(str(cfg.fit.teacher))
    except ValueError as e:
        raise ConfigError(f"sampler={name} / fit.teacher={cfg.fit.teacher}: {e}") from None
    for s, key in ((smp, "sampler"), (teacher, "fit.teacher")):
        if s.stochastic or s.adaptive:
            raise ConfigError(f"{key}={s.name}: a learned grid needs a deterministic sampler")
    module = load_module(cfg.ckpt, pick_device(cfg.device))
    dtype = DTYPES[cfg.fit.dtype]
    denoiser_of(module, bool(cfg.use_ema)).to(dtype).requires_grad_(False)
    # a conditional model is fitted unconditioned (its null condition, as label dropout trains)
    denoise = DiffusionGenerator.from_module(module, spec, use_ema=bool(cfg.use_ema)).denoiser()
    schedule = module.schedule
    lo, hi = float(schedule.sigma_min), float(schedule.sigma_max)
    # fit.* are GridFitSettings fields (learn_ends: the bounds are the schedule's sigma range)
    values = OmegaConf.to_container(cfg.fit, resolve=True)
    learn_ends = values.pop("learn_ends")
    settings = GridFitSettings(
        **{**values, "teacher": teacher.name, "dtype": dtype},
        sigma_min=lo,
        sigma_max=hi,
        bounds=(lo, hi) if learn_ends else None,
    )
    try:
        fit = fit_discretization(
            denoise,
            tuple(module.data_shape),
            smp,
            nfe,
            settings,
            schedule=schedule,
            device=module.device,
            log=log.info,
        )
    except ValueError as e:
        raise ConfigError(f"sampler={name} nfe={nfe}: {e}") from None
    path = Path(cfg.dest).expanduser() if cfg.dest else grid_path(cfg.ckpt, name, nfe)
    save_grid(path, fit, cfg.ckpt)
    log.info(
        "%s nfe=%d: held-out distance to the teacher %.5g -> %.5g (%.1f s); grid %s -> %s",
        name,
        nfe,
        fit.heldout_before,
        fit.heldout_after,
        fit.seconds,
        [round(s, 5) for s in fit.sigmas.tolist()],
        path,
    )
    return path, fit


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="fit_grid")
@user_errors_exit
def app(cfg: DictConfig) -> None:
    fit_grid(cfg)


def main() -> None:
    """``dl-fit-sigmas``: user errors end as one ``error: ...`` line, as in the other apps."""
    run_cli(app, "fit_grid")


def main_old_name() -> None:
    """``dl-fit-grid``, the old name of ``dl-fit-sigmas`` (one more release, with a warning)."""
    warn_old_command("dl-fit-grid")
    main()


if __name__ == "__main__":
    main()
