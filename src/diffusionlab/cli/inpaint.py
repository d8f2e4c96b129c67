"""``dl-inpaint ckpt=... mask=centre_box``: RePaint inpainting (Lugmayr et al. 2022) of given
images; ``inpaint.png`` has one row per input (input, masked input, ``num_samples`` fills) and
``inpaint.json`` the largest change of a kept pixel (0: kept bitwise)."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from diffusionlab.checks import number
from diffusionlab.cli.common import run_cli, user_errors_exit
from diffusionlab.cli.image_apps import input_images, load_model, save_grid, write_results
from diffusionlab.cli.masks import load_mask
from diffusionlab.config import CONF_DIR
from diffusionlab.diffusion.editing import repaint


def inpaint(cfg: DictConfig) -> Path:
    """Write ``inpaint.png`` and ``inpaint.json`` into ``cfg.outdir``."""
    k = int(number(cfg, "num_samples", int, at_least=1))
    resample = int(number(cfg, "resample", int, at_least=1))
    seed = int(number(cfg, "seed", int))
    scale = int(number(cfg, "scale", int, at_least=1))
    model = load_model(cfg)
    mask = load_mask(str(cfg.mask), *model.shape[1:]).to(model.device)
    x = input_images(cfg, model)
    n = x.shape[0]
    known = x.repeat_interleave(k, 0)  # input i's fills are rows i*k .. i*k + k - 1
    seeds = [seed + j for j in range(n * k)]
    noise = model.generator.noise_generator(seeds, "cpu")
    out = repaint(model.denoise, known, mask, model.sigmas, resample, noise)
    keep = ~mask.expand_as(known)
    kept_change = float((out - known)[keep].abs().max()) if bool(keep.any()) else 0.0
    shown = torch.where(mask, torch.zeros_like(x), x)
    rows = torch.cat([x[:, None], shown[:, None], out.clamp(-1, 1).reshape(n, k, *x.shape[1:])], 1)
    outdir = Path(cfg.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    save_grid(rows, outdir / "inpaint.png", scale)
    write_results(
        outdir / "inpaint.json",
        {
            "mask": str(cfg.mask),
            "masked_fraction": float(mask.float().mean()),
            "resample": resample,
            "nfe_per_image": (len(model.sigmas) - 2) * resample + 1,
            "max_change_of_kept_pixels": kept_change,
        },
    )
    return outdir


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="inpaint")
@user_errors_exit
def app(cfg: DictConfig) -> None:
    inpaint(cfg)


def main() -> None:
    """``dl-inpaint``: user errors end as one ``error: ...`` line."""
    run_cli(app, "inpaint")


if __name__ == "__main__":
    main()
