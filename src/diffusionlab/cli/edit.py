"""``dl-edit ckpt=... sigma_edit=[...]``: SDEdit (Meng et al. 2022) of given images, one row per
input, one column per strength, in ``edit.png``; ``edit.json`` holds the RMS change per strength."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, ListConfig

from diffusionlab.checks import number
from diffusionlab.cli.common import run_cli, user_errors_exit
from diffusionlab.cli.image_apps import input_images, load_model, save_grid, write_results
from diffusionlab.config import CONF_DIR
from diffusionlab.diffusion.editing import sdedit
from diffusionlab.errors import ConfigError


def strengths(cfg: DictConfig) -> list[float]:
    """``sigma_edit`` (one number or a list) as a non-empty list of noise levels >= 0."""
    if not isinstance(cfg.sigma_edit, ListConfig):
        keys = ["sigma_edit"]
    elif len(cfg.sigma_edit):
        keys = [f"sigma_edit[{i}]" for i in range(len(cfg.sigma_edit))]
    else:
        raise ConfigError("sigma_edit=[] needs at least one noise level")
    out = [float(number(cfg, key)) for key in keys]
    bad = [s for s in out if s < 0]
    if bad:
        raise ConfigError(f"sigma_edit={out}: noise levels must be >= 0, got {bad}")
    return out


def edit(cfg: DictConfig) -> Path:
    """Write ``edit.png`` (inputs x strengths) and ``edit.json`` into ``cfg.outdir``."""
    sigmas_edit = strengths(cfg)
    seed = int(number(cfg, "seed", int))
    model = load_model(cfg)
    x = input_images(cfg, model)
    seeds = [seed + i for i in range(x.shape[0])]
    columns, rms = [x], {}
    for s in sigmas_edit:
        noise = model.generator.noise_generator(seeds, "cpu")
        out = sdedit(model.denoise, x, s, model.sigmas, model.sampler, noise)
        columns.append(out.clamp(-1, 1))
        rms[f"{s:g}"] = float((out - x).pow(2).mean().sqrt())
    outdir = Path(cfg.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    save_grid(
        torch.stack(columns, 1), outdir / "edit.png", int(number(cfg, "scale", int, at_least=1))
    )
    write_results(outdir / "edit.json", {"sigma_edit": sigmas_edit, "rms_change": rms})
    return outdir


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="edit")
@user_errors_exit
def app(cfg: DictConfig) -> None:
    edit(cfg)


def main() -> None:
    """``dl-edit``: user errors end as one ``error: ...`` line."""
    run_cli(app, "edit")


if __name__ == "__main__":
    main()
