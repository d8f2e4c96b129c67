"""The published presets (conf/experiment/): each composes with the paper's hyperparameters, and
each command of docs/recipes.md trains a few steps on CPU on synthetic data of the preset's shape."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from diffusionlab.cli.common import user_message
from diffusionlab.cli.train import build, train
from diffusionlab.errors import ConfigError

from .helpers import ROOT, compose_train, fast_overrides, run_app

DOC = ROOT / "docs" / "recipes.md"

# preset -> (dataset shape (channels, resolution, classes) or None for its own CPU dataset,
#            overrides that shrink its network to a few thousand parameters for the CPU run)
SONG_TINY = [
    "model.model_channels=16",
    "model.channel_mult=[1,2]",
    "model.num_blocks=1",
    "model.attn_resolutions=[16]",
]
PRESETS = {
    "ddpm_cifar10": ((3, 32, 0), SONG_TINY),
    "edm_cifar10_ddpmpp": ((3, 32, 0), SONG_TINY),
    "edm_cifar10_ncsnpp": ((3, 32, 0), SONG_TINY),
    "edm2_img64_s": (
        (3, 64, 2),
        [
            "model.model_channels=32",
            "model.channel_mult=[1,2]",
            "model.num_blocks=1",
            "model.attn_resolutions=[32]",
            "loss.weighting.channels=8",
        ],
    ),
    "rf_cifar10": ((3, 32, 0), SONG_TINY),
    "ddpm_mnist": ((1, 16, 0), ["model=unet_tiny"]),
    "edm_mnist": ((1, 32, 0), ["model=unet_tiny"]),
    "flow_mnist": ((1, 16, 0), ["model=unet_tiny"]),
    "toy2d": (None, ["model=mlp_tiny"]),
}

# the papers' values (a typo in a preset fails here); comments give the source
PAPER = {
    "ddpm_cifar10": {  # Ho et al. 2020, Sec. 4 and App. B
        "schedule._target_": "diffusionlab.diffusion.schedules.DDPMSchedule",
        "schedule.num_steps": 1000,
        "schedule.beta_start": 1e-4,
        "schedule.beta_end": 0.02,
        "parameterization._target_": "diffusionlab.diffusion.parameterizations.EpsParam",
        "loss.weighting._target_": "diffusionlab.diffusion.weightings.SimpleWeighting",
        "model.model_channels": 128,
        "model.channel_mult": [1, 2, 2, 2],
        "model.num_blocks": 2,
        "model.attn_resolutions": [16],
        "model.dropout": 0.1,
        "optimizer._target_": "torch.optim.Adam",
        "optimizer.lr": 2e-4,
        "lr_warmup_steps": 5000,
        "data.batch_size": 128,
        "data.hflip": True,
        "trainer.max_steps": 800_000,
        "trainer.gradient_clip_val": 1.0,
        "ema.decay": 0.9999,
        "ema.warmup": False,
        "sampler.name": "ddpm",
        "sampler.nfe": 1000,
        "dataset.resolution": 32,
    },
    "edm_cifar10_ddpmpp": {  # EDM Table 7 / NVlabs/edm train.py defaults, --arch=ddpmpp
        "model.embedding_type": "positional",
        "model.encoder_type": "standard",
        "model.resample_filter": [1, 1],
        "model.channel_mult": [2, 2, 2],
        "model.num_blocks": 4,
        "model.dropout": 0.13,
        "parameterization._target_": "diffusionlab.diffusion.parameterizations.EDMParam",
        "parameterization.sigma_data": 0.5,
        "loss.noise.p_mean": -1.2,
        "loss.noise.p_std": 1.2,
        "optimizer.lr": 1e-3,
        "optimizer.betas": [0.9, 0.999],
        "optimizer.eps": 1e-8,
        "lr_warmup_steps": 10_000_000 // 512,
        "data.batch_size": 512,
        "trainer.max_steps": 200_000_000 // 512,
        "trainer.gradient_clip_val": None,
        "trainer.precision": "32-true",
        "ema.halflife_kimg": 500,
        "ema.warmup_ratio": 0.05,
        "grad_nan_to_num": True,
        "augment.p": 0.12,
        "augment.xflip": 1e8,
        "model.augment_dim": 9,
        "sampler.name": "heun",
        "sampler.nfe": 35,
        "label_dim": 0,
    },
    "edm2_img64_s": {  # NVlabs/edm2 train_edm2.py preset edm2-img64-s, training_loop defaults
        "dataset._target_": "diffusionlab.data.image_archive.ImageArchive",
        "dataset.resolution": 64,
        "dataset.num_classes": 1000,
        "label_dim": 1000,
        "model._target_": "diffusionlab.networks.EDM2UNet",
        "model.model_channels": 192,
        "model.dropout": 0.0,
        "loss.noise.p_mean": -0.8,
        "loss.noise.p_std": 1.6,
        "loss.weighting._target_": "diffusionlab.diffusion.weightings.UncertaintyWeighting",
        "optimizer._target_": "torch.optim.Adam",
        "optimizer.lr": 0.0100,
        "optimizer.betas": [0.9, 0.99],
        "lr_schedule._target_": "diffusionlab.training.lr_schedules.InverseSqrt",
        "lr_schedule.ref_batches": 35000,
        "ema._target_": "diffusionlab.training.ema.PowerEMA",
        "ema.sigma_rels": [0.05, 0.10],
        "ema.snapshot_every": 4096,
        "lr_schedule.warmup_steps": round(10e6 / 2048),
        "data.batch_size": 2048,
        "trainer.max_steps": (1024 << 20) // 2048,
        "grad_nan_to_num": True,
        "sampler.name": "heun",
        "sampler.nfe": 63,
    },
    "rf_cifar10": {  # gnobitab/RectifiedFlow cifar10_rf_gaussian_ddpmpp + default_cifar10_configs
        "schedule._target_": "diffusionlab.diffusion.schedules.FlowSchedule",
        "schedule.t_min": 1e-3,
        "parameterization._target_": "diffusionlab.diffusion.parameterizations.FlowParam",
        "loss.noise._target_": "diffusionlab.diffusion.noise_distributions.UniformT",
        "model.model_channels": 128,
        "model.channel_mult": [1, 2, 2, 2],
        "model.num_blocks": 4,
        "model.attn_resolutions": [16],
        "model.dropout": 0.15,
        "model.embedding_type": "positional",
        "optimizer.lr": 2e-4,
        "lr_warmup_steps": 5000,
        "data.batch_size": 128,
        "data.hflip": True,
        "trainer.max_steps": 1_300_000,
        "trainer.gradient_clip_val": 1.0,
        "ema.decay": 0.999999,
        "sampler.name": "rk45",
        "sampler.options.rtol": 1e-5,
        "sampler.options.atol": 1e-5,
    },
}
# NCSN++ = DDPM++ training with the VE network (NVlabs/edm train.py --arch=ncsnpp)
PAPER["edm_cifar10_ncsnpp"] = {
    **PAPER["edm_cifar10_ddpmpp"],
    "model.embedding_type": "fourier",
    "model.channel_mult_noise": 2,
    "model.encoder_type": "residual",
    "model.resample_filter": [1, 3, 3, 1],
}


def doc_commands() -> dict[str, list[str]]:
    """preset -> the arguments of its ``python train.py experiment=...`` command in the docs."""
    out = {}
    for cmd in re.findall(r"`(python train\.py experiment=[^`]+)`", DOC.read_text()):
        args = shlex.split(cmd)[2:]
        out[args[0].removeprefix("experiment=")] = args
    return out


def image_folder(root: Path, channels: int, resolution: int, classes: int, n: int = 8) -> Path:
    """``n`` random PNGs of the given shape, in ``classes`` sub-folders when ``classes > 0``."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % classes}" if classes else root
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (resolution, resolution, channels), dtype=np.uint8)
        Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).save(folder / f"{i}.png")
    return root


def cpu_overrides(tmp_path: Path, preset: str) -> list[str]:
    """Two optimizer steps on the CPU on synthetic data of the preset's shape, its network
    shrunk (same family and options), a 4-image sample grid at the end."""
    shape, tiny = PRESETS[preset]
    keep = [o for o in fast_overrides(tmp_path) if "dataset=" not in o]
    keep = [o for o in keep if not o.startswith(("model=", "data.batch_size", "trainer.max_steps"))]
    out = [*keep, *tiny, "data.batch_size=4", "data.num_workers=0", "trainer.max_steps=2"]
    out += ["trainer.accelerator=cpu", "trainer.devices=1", "++trainer.strategy=auto"]
    out += ["trainer.precision=32-true", "lr_warmup_steps=1"]
    if shape is not None:
        channels, resolution, classes = shape
        folder = image_folder(tmp_path / "images", channels, resolution, classes)
        out += ["dataset=image_folder", f"dataset.path={folder}"]
        out += [f"dataset.resolution={resolution}", f"dataset.channels={channels}"]
        out += [f"dataset.num_classes={classes}"]
    return out


def merged(args: list[str], overrides: list[str]) -> list[str]:
    """``args`` with every key that ``overrides`` sets replaced by the override."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [a for a in args if a.split("=", 1)[0] not in keys] + overrides


def test_the_docs_list_every_preset():
    presets = {p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")}
    # iddpm_cifar10 trains in test_families.py (its learned variance needs its own check)
    assert set(doc_commands()) == {*PRESETS, "iddpm_cifar10"} <= presets


@pytest.mark.parametrize("preset", sorted(PAPER))
def test_preset_has_the_papers_hyperparameters(tmp_path, preset):
    cfg = compose_train(doc_commands()[preset], tmp_path)
    got = {k: OmegaConf.select(cfg, k) for k in PAPER[preset]}
    got = {k: list(v) if OmegaConf.is_list(v) else v for k, v in got.items()}
    assert got == PAPER[preset]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_docs_command_trains_two_steps_on_cpu(tmp_path, preset):
    overrides = merged(doc_commands()[preset], cpu_overrides(tmp_path, preset))
    train(compose_train(overrides, tmp_path))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert ckpt["hyper_parameters"]["optimizer"]["lr"] == OmegaConf.select(
        compose_train(doc_commands()[preset], tmp_path), "optimizer.lr"
    )


@pytest.mark.slow
def test_docs_command_runs_as_a_subprocess(tmp_path):
    args = merged(doc_commands()["edm2_img64_s"], cpu_overrides(tmp_path, "edm2_img64_s"))
    res = run_app("train.py", args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "edm2_img64_s").is_dir()


def test_edm2_img64_without_its_folder_says_which_key(tmp_path):
    args = [a for a in doc_commands()["edm2_img64_s"] if not a.startswith("dataset.path=")]
    with pytest.raises(ConfigError) as e:
        build(compose_train(args, tmp_path))
    assert user_message(e.value) == "dataset.path: a value is required (e.g. dataset.path=...)"
    with pytest.raises(ConfigError, match=r"dataset.path='/nowhere/img64.zip' does not exist"):
        build(compose_train([*args, "dataset.path=/nowhere/img64.zip"], tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("preset", "params"),
    [
        ("ddpm_cifar10", 39_390_339),
        ("rf_cifar10", 61_804_419),
        # EDM's counts (conf/model/unet_ddpmpp.yaml: 55,732,739) + the augment-label embedding
        # (9 x noise channels: 128 for DDPM++, 256 for NCSN++) that EDM's CIFAR-10 networks carry
        ("edm_cifar10_ddpmpp", 55_732_739 + 9 * 128),
        ("edm_cifar10_ncsnpp", 56_395_523 + 9 * 256),
    ],
)
def test_full_size_network_maps_cifar_shape(tmp_path, preset, params):
    folder = image_folder(tmp_path / "images", 3, 32, 0, n=2)
    overrides = [*doc_commands()[preset], "dataset=image_folder", f"dataset.path={folder}"]
    overrides += ["data.batch_size=2"]
    module, _ = build(compose_train(overrides, tmp_path))  # build() runs one forward pass
    assert sum(p.numel() for p in module.denoiser.parameters()) == params
