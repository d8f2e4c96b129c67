"""``dl-interpolate ckpt=...``: interpolation paths in a model's latent space, one row per pair in
``interpolate.png``.

``mode=latent``: pairs of real images are inverted to x(sigma_max) by integrating the
probability-flow ODE from data to noise (:func:`invert_ode`), the latents are slerped and sampled
back with the (deterministic) sampler; each row is the first image, the path, the second image.
``interpolate.json`` holds the reconstruction error of the inputs (the path's end points).
``mode=noise``: the slerp runs between the standard-normal noises of seeds (seed + 2p, seed + 2p + 1).
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from diffusionlab.checks import number
from diffusionlab.cli.common import run_cli, user_errors_exit
from diffusionlab.cli.image_apps import (
    TrainedModel,
    input_images,
    load_model,
    save_grid,
    write_results,
)
from diffusionlab.config import CONF_DIR
from diffusionlab.diffusion.latents import INVERSION_SOLVERS, invert_ode, slerp
from diffusionlab.errors import ConfigError

MODES = ("latent", "noise")


def interpolate(cfg: DictConfig) -> Path:
    """Write ``interpolate.png`` and ``interpolate.json`` into ``cfg.outdir``."""
    if cfg.mode not in MODES:
        raise ConfigError(f"mode={cfg.mode!r} must be one of {', '.join(MODES)}")
    if cfg.solver not in INVERSION_SOLVERS:
        raise ConfigError(f"solver={cfg.solver!r} must be one of {', '.join(INVERSION_SOLVERS)}")
    steps = int(number(cfg, "steps", int, at_least=2))
    scale = int(number(cfg, "scale", int, at_least=1))
    model = load_model(cfg)
    if model.sampler.stochastic:
        raise ConfigError(
            f"sampler={model.sampler.name} is stochastic; interpolation needs a deterministic "
            "sampler (e.g. sampler=heun) so that a latent maps to one image"
        )
    ts = torch.linspace(0, 1, steps, device=model.device)
    if cfg.mode == "latent":
        x = input_images(cfg, model)
        if x.shape[0] % 2:
            raise ConfigError(
                f"mode=latent pairs consecutive inputs; got {x.shape[0]} images (pass an even "
                "number of inputs.indices)"
            )
        z = invert_ode(model.denoise, x, model.sigmas, cfg.solver)
        a, b = z[0::2], z[1::2]
        positive = len(model.sigmas) - 1
        results = {
            "mode": "latent",
            "solver": cfg.solver,
            "nfe_invert": (positive - 1) * (2 if cfg.solver == "heun" else 1),
        }
    else:
        pairs = int(number(cfg, "pairs", int, at_least=1))
        seeds = range(int(number(cfg, "seed", int)), int(cfg.seed) + 2 * pairs)
        noise, _ = model.generator.seeded_noise(seeds)
        a, b = noise[0::2] * model.sigmas[0], noise[1::2] * model.sigmas[0]
        results = {"mode": "noise"}
    path = _path(model, a, b, ts)  # [pairs, steps, C, H, W]
    results["nfe_sample"] = model.sampler.nfe
    if cfg.mode == "latent":
        ends = torch.stack([path[:, 0], path[:, -1]], 1).reshape_as(x)
        err = ends - x
        results["reconstruction_rmse"] = float(err.pow(2).mean().sqrt())
        results["reconstruction_max_abs"] = float(err.abs().max())
        path = torch.cat([x[0::2, None], path, x[1::2, None]], 1)
    outdir = Path(cfg.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    save_grid(path.clamp(-1, 1), outdir / "interpolate.png", scale)
    write_results(outdir / "interpolate.json", results)
    return outdir


def _path(model: TrainedModel, a: torch.Tensor, b: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Sample slerp(a, b, t) for every pair and t; ``[pairs, len(ts), *shape]``."""
    p, k = a.shape[0], len(ts)
    za, zb = a.repeat_interleave(k, 0), b.repeat_interleave(k, 0)
    z = slerp(za, zb, ts.repeat(p))
    out = model.sampler(model.denoise, z, model.sigmas)
    return out.reshape(p, k, *a.shape[1:])


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="interpolate")
@user_errors_exit
def app(cfg: DictConfig) -> None:
    interpolate(cfg)


def main() -> None:
    """``dl-interpolate``: user errors end as one ``error: ...`` line."""
    run_cli(app, "interpolate")


if __name__ == "__main__":
    main()
