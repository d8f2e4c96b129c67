"""dl-edit, dl-inpaint, dl-interpolate on a checkpoint trained for 3 steps on the 8x8 digits:
every command of docs/editing.md as written, kept pixels bitwise in the PNG, ODE inversion of the
trained model, masks and the errors a user can cause."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from diffusionlab.cli.edit import edit
from diffusionlab.cli.inpaint import inpaint
from diffusionlab.cli.interpolate import interpolate
from diffusionlab.cli.masks import load_mask, named_mask
from diffusionlab.config import CONF_DIR
from diffusionlab.diffusion.latents import invert_ode
from diffusionlab.diffusion.samplers import get_sampler, sigmas_for_nfe
from diffusionlab.errors import ConfigError
from diffusionlab.sampling.checkpoint import load_module

from .helpers import ROOT, fast_overrides, run_app

DOC = ROOT / "docs" / "editing.md"
APPS = {"dl-edit": edit, "dl-inpaint": inpaint, "dl-interpolate": interpolate}
FAST = ["inputs.indices=[0,1,2,3]", "sampler.nfe=3"]
FAST_APP = {"edit": [], "inpaint": ["num_samples=2"], "interpolate": ["steps=3", "pairs=2"]}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tiny_run")
    res = run_app("train.py", [*fast_overrides(tmp), "~callbacks.sample_grid"])
    assert res.returncode == 0, res.stderr[-2000:]
    return next(tmp.rglob("last.ckpt"))


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def _doc_commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    return [shlex.split(ln) for b in blocks for ln in b.splitlines() if ln.startswith("dl-")]


def _cells(png: Path, rows: int, cols: int, size: int, scale: int) -> np.ndarray:
    """The grid PNG back as uint8 images [rows, cols, size, size] (first channel)."""
    img = np.asarray(Image.open(png))[..., 0]
    step = (size + 1) * scale
    out = np.empty((rows, cols, size, size), np.uint8)
    for r in range(rows):
        for c in range(cols):
            y, x = r * step + scale, c * step + scale
            out[r, c] = img[y : y + size * scale : scale, x : x + size * scale : scale]
    return out


def _run_module(name: str, args: list[str]) -> subprocess.CompletedProcess:
    """``python -m diffusionlab.cli.<name> <args>`` (the ``dl-<name>`` console script)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, "-m", f"diffusionlab.cli.{name}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


def test_every_doc_command_runs(ckpt, tmp_path):
    commands = _doc_commands()
    assert {c[0] for c in commands} == set(APPS)
    results = {}
    for i, (app, *args) in enumerate(commands):
        args = [a.replace("$CKPT", str(ckpt)) for a in args]
        out, name = tmp_path / f"{i}", app[3:]
        fast = [*FAST, *FAST_APP[name], f"outdir={out}", f"paths.log_dir={tmp_path}"]
        APPS[app](_compose(name, [*args, *fast]))
        assert (out / f"{name}.png").is_file()
        results.setdefault(name, []).append(json.loads((out / f"{name}.json").read_text()))
    assert results["inpaint"][0]["max_change_of_kept_pixels"] == 0.0
    latent = [r for r in results["interpolate"] if r["mode"] == "latent"]
    assert latent and all(np.isfinite(r["reconstruction_rmse"]) for r in latent)
    rms = list(results["edit"][0]["rms_change"].values())
    assert rms == sorted(rms) and rms[0] < rms[-1]


def test_inpaint_png_keeps_unmasked_pixels(ckpt, tmp_path):
    """End to end through the console script: in inpaint.png every fill equals its input
    outside the left half, pixel for pixel, and differs inside it."""
    args = [f"ckpt={ckpt}", "mask=left_half", "resample=2", f"outdir={tmp_path}", *FAST]
    args += FAST_APP["inpaint"]
    res = _run_module("inpaint", [*args, f"paths.log_dir={tmp_path}"])
    assert res.returncode == 0, res.stderr[-2000:]
    cells = _cells(tmp_path / "inpaint.png", 4, 4, 8, 2)
    inputs, fills = cells[:, :1], cells[:, 2:]
    assert np.array_equal(np.broadcast_to(inputs[..., 4:], fills[..., 4:].shape), fills[..., 4:])
    assert not np.array_equal(
        np.broadcast_to(inputs[..., :4], fills[..., :4].shape), fills[..., :4]
    )
    # the second column shows the hole in grey (0 -> 128)
    assert (cells[:, 1, :, :4] == 128).all()


def test_inversion_round_trip_of_a_trained_model(ckpt):
    """PF-ODE inversion then Heun sampling on the same grid gives the digits back; the error falls
    with the NFE (second-order solver on both legs)."""
    from diffusionlab.evaluation.reference import load_dataset

    module = load_module(str(ckpt), torch.device("cpu"))
    x = load_dataset("digits", 8).images[:16]

    def denoise(x, sigma):
        return module.ema(x, sigma)

    errors = {}
    with torch.no_grad():
        for nfe in (9, 101):
            sig = sigmas_for_nfe(module.schedule, "heun", nfe, dtype=torch.float32)
            back = get_sampler("heun")(denoise, invert_ode(denoise, x, sig), sig)
            errors[nfe] = float((back - x).pow(2).mean().sqrt())
    assert errors[101] < 0.02 and errors[101] < errors[9] / 4


def test_images_from_a_folder_or_npz(ckpt, tmp_path):
    from diffusionlab.evaluation.reference import load_dataset

    x = load_dataset("digits", 8).images[:2]
    u8 = ((x[:, 0] + 1) * 127.5).round().byte().numpy()
    (tmp_path / "in").mkdir()
    for i, img in enumerate(u8):
        Image.fromarray(img).save(tmp_path / "in" / f"{i}.png")
    np.savez(tmp_path / "in.npz", samples=u8[..., None])
    for source in ("in", "in.npz"):
        out = tmp_path / f"out_{source}"
        cfg = _compose(
            "edit",
            [f"ckpt={ckpt}", f"inputs.path={tmp_path / source}", "sigma_edit=[0]", "sampler.nfe=2"]
            + [f"outdir={out}", "scale=1"],
        )
        edit(cfg)
        cells = _cells(out / "edit.png", 2, 2, 8, 1)
        assert np.array_equal(cells[:, 1], u8)  # sigma_edit = 0 returns the input


def test_named_and_file_masks(tmp_path):
    assert named_mask("left_half", 4, 6)[0, 0].tolist()[0] == [True] * 3 + [False] * 3
    assert named_mask("top_half", 4, 2)[0, 0, :, 0].tolist() == [True, True, False, False]
    box = named_mask("centre_box", 8, 8)[0, 0]
    assert box.sum() == 16 and box[2:6, 2:6].all()
    assert torch.equal(named_mask("center_box", 8, 8), named_mask("centre_box", 8, 8))
    assert torch.equal(named_mask("right_half", 8, 8), ~named_mask("left_half", 8, 8))
    arr = np.zeros((8, 8), np.uint8)
    arr[1, 2] = 255
    Image.fromarray(arr).save(tmp_path / "m.png")
    m = load_mask(str(tmp_path / "m.png"), 8, 8)
    assert m.sum() == 1 and m[0, 0, 1, 2]
    with pytest.raises(ConfigError, match="mask='diagonal' is neither a mask name"):
        load_mask("diagonal", 8, 8)
    with pytest.raises(ConfigError, match="is 8x8; the model's images are 16x16"):
        load_mask(str(tmp_path / "m.png"), 16, 16)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "black.png")
    with pytest.raises(ConfigError, match="no white pixel"):
        load_mask(str(tmp_path / "black.png"), 8, 8)


@pytest.mark.parametrize(
    ("app", "overrides", "message"),
    [
        ("edit", ["sigma_edit=[1,-2]"], "noise levels must be >= 0"),
        ("edit", ["inputs.indices=[0,9999]"], r"\[9999\] out of range"),
        ("interpolate", ["inputs.indices=[0,1,2]"], "even number of inputs.indices"),
        ("interpolate", ["sampler=euler_ancestral"], "needs a deterministic sampler"),
        ("inpaint", ["resample=0"], "resample=0 must be >= 1"),
        ("inpaint", ["inputs.path=/nonexistent"], "inputs.path='/nonexistent' is not a folder"),
    ],
)
def test_user_errors(ckpt, tmp_path, app, overrides, message):
    cfg = _compose(app, [f"ckpt={ckpt}", f"outdir={tmp_path}", "sampler.nfe=2", *overrides])
    with pytest.raises(ConfigError, match=message):
        {"edit": edit, "inpaint": inpaint, "interpolate": interpolate}[app](cfg)


def test_cli_error_is_one_line(ckpt, tmp_path):
    res = _run_module("inpaint", [f"ckpt={ckpt}", "mask=diagonal", f"outdir={tmp_path}"])
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("error: mask='diagonal' is neither")
