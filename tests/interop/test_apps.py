"""The apps that take ckpt= take a pickle or an exported folder too: editing apps, dl-fit-sigmas
(its grid beside the pickle, inside the folder) and train.py init_ckpt=."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from app.helpers import compose_train, fast_overrides
from diffusionlab.cli.edit import edit
from diffusionlab.cli.export import export
from diffusionlab.cli.fit_grid import fit_grid
from diffusionlab.cli.inpaint import inpaint
from diffusionlab.cli.interpolate import interpolate
from diffusionlab.cli.train import train
from diffusionlab.config import CONF_DIR
from diffusionlab.sampling.checkpoint import load_module
from diffusionlab.training.checkpoint_io import read_checkpoint

from .tiny_pickles import write_tiny

FIT = [
    "fit.teacher_nfe=6",
    "fit.num_samples=4",
    "fit.num_validation=2",
    "fit.num_heldout=4",
    "fit.batch_size=4",
    "fit.steps=2",
    "device=cpu",
]
TINY_MODEL = [
    "model.model_channels=16",
    "model.channel_mult=[1,2]",
    "model.num_blocks=1",
    "model.attn_resolutions=[4]",
    "model.augment_dim=9",
    "label_dim=10",
]


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture(scope="module")
def digits_pkl(tmp_path_factory):
    """EDMPrecond + DDPM++ for 8x8x1 digits, 10 classes, with augmentation labels."""
    tmp = tmp_path_factory.mktemp("pkl")
    return write_tiny("edm_ddpmpp", tmp, channels=1)


@pytest.mark.parametrize(
    ("app", "name", "extra"),
    [
        (edit, "edit", ["sigma_edit=[0.5,5]"]),
        (inpaint, "inpaint", ["num_samples=2"]),
        (interpolate, "interpolate", ["steps=3", "pairs=2"]),
    ],
)
def test_editing_apps_on_a_pickle(digits_pkl, tmp_path, app, name, extra):
    pkl, _ = digits_pkl
    cfg = _compose(
        name,
        [
            f"ckpt={pkl}",
            "dataset=digits",
            "inputs.indices=[0,1,2,3]",
            "sampler.nfe=3",
            "device=cpu",
            f"outdir={tmp_path}",
            f"paths.output_dir={tmp_path}",
            *extra,
        ],
    )
    app(cfg)
    assert list(tmp_path.glob("*.png"))


def test_fit_grid_beside_a_pickle_and_inside_an_exported_folder(digits_pkl, tmp_path):
    pkl, _ = digits_pkl
    dest = export(_compose("export", [f"ckpt={pkl}", f"dest={tmp_path / 'm'}"]))
    for ckpt, where in ((pkl, pkl.parent), (dest, dest)):
        path, _ = fit_grid(
            _compose("fit_grid", [f"ckpt={ckpt}", "sampler=dpmpp_2m", "sampler.nfe=4", *FIT])
        )
        assert path == where / "grids" / "dpmpp_2m_nfe4.json"
        assert len(json.loads(path.read_text())["sigmas"]) == 5


def test_fine_tune_run_starts_from_the_pickle(digits_pkl, tmp_path):
    """train.py init_ckpt=<pkl>: the first step's weights are one Adam step from the pickle's."""
    pkl, net = digits_pkl
    overrides = [
        *fast_overrides(tmp_path),
        "~callbacks.sample_grid",
        "~callbacks.perf",
        "trainer.max_steps=1",
        "channels_last=false",
        "optimizer.lr=1e-6",
        "lr_warmup_steps=0",
        *TINY_MODEL,
        f"init_ckpt={pkl}",
    ]
    run = tmp_path / "run"
    train(compose_train(overrides, run))
    sd = read_checkpoint(run / "checkpoints" / "last.ckpt", "ckpt")["state_dict"]
    start = net.state_dict()
    moved = [
        (sd[f"denoiser.net.{k}"] - v).abs().max().item()
        for k, v in start.items()
        if v.is_floating_point()
    ]
    assert 0 < max(moved) < 1e-4  # one small Adam step away from the pickle's weights
    module = load_module(str(run / "checkpoints" / "last.ckpt"), torch.device("cpu"))
    assert module.hparams.model["augment_dim"] == 9
