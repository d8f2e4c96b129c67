"""dl-fit-sigmas: a grid fitted to a checkpoint, stored beside it, found by
``sampler.discretization=learned`` in sample.py, evaluate.py and training, and refused when it
does not fit the sampler, NFE or checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from diffusionlab.cli.common import USER_ERRORS, user_message
from diffusionlab.cli.fit_grid import fit_grid
from diffusionlab.cli.sample import sample
from diffusionlab.cli.train import train
from diffusionlab.config import CONF_DIR
from diffusionlab.diffusion.learned_grids import load_grid, resolve_sampler
from diffusionlab.diffusion.samplers import check_sigmas
from diffusionlab.files import file_sha256
from diffusionlab.sampling.checkpoint import load_module
from diffusionlab.sampling.generator import generate
from diffusionlab.sampling.images import to_uint8_rgb
from diffusionlab.stopping import Stopped

from .helpers import compose_train, fast_overrides

FIT = [
    "fit.teacher_nfe=6",
    "fit.num_samples=4",
    "fit.num_validation=2",
    "fit.num_heldout=4",
    "fit.batch_size=4",
    "fit.steps=2",
    "fit.eval_every=1",
    "device=cpu",
]


def _compose(name: str, overrides: list[str], output_dir: Path | None = None):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


def _message(fn) -> str:
    with pytest.raises(USER_ERRORS) as e:
        fn()
    text = user_message(e.value)
    assert "\n" not in text and "Traceback" not in text
    return text


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny digits checkpoint (2 steps) and the dpmpp_2m NFE-4 grid fitted beside it."""
    run = tmp_path_factory.mktemp("run")
    train(compose_train([*fast_overrides(run), "trainer.max_steps=2"], run))
    ckpt = run / "checkpoints" / "last.ckpt"
    path, _ = fit_grid(_compose("fit_grid", [f"ckpt={ckpt}", "sampler.nfe=4", *FIT]))
    return ckpt, path


def test_the_stored_grid_round_trips_with_its_settings(fitted):
    ckpt, path = fitted
    assert path == ckpt.parent / "grids" / "dpmpp_2m_nfe4.json"
    record = load_grid(path)
    raw = json.loads(path.read_text())
    assert record["sigmas"] == raw["sigmas"] and len(record["sigmas"]) == 5
    check_sigmas(torch.tensor(record["sigmas"], dtype=torch.float64))
    assert (record["sampler"], record["nfe"], record["options"]) == (
        "dpmpp_2m",
        4,
        {"eta": 0.0, "s_noise": 1.0, "solver_type": "midpoint"},
    )
    assert record["ckpt"] == "last.ckpt" and record["ckpt_sha256"] == file_sha256(ckpt)
    assert record["settings"]["teacher_nfe"] == 6 and record["settings"]["bounds"] == [0.002, 80]
    assert record["heldout_after"] <= record["heldout_before"]
    found = resolve_sampler({"name": "dpmpp_2m", "nfe": 4, "discretization": "learned"}, ckpt)
    assert found["sigmas"] == record["sigmas"]


def test_sample_py_draws_with_the_stored_grid(fitted, tmp_path):
    ckpt, path = fitted
    args = [
        f"ckpt={ckpt}",
        "sampler=dpmpp_2m",
        "sampler.nfe=4",
        "num_samples=3",
        "npz=true",
        "png=false",
    ]
    out = sample(_compose("sample", [*args, "sampler.discretization=learned"], tmp_path / "a"))
    got = np.load(out / "samples.npz")["samples"]
    module = load_module(str(ckpt), torch.device("cpu"))
    sigmas = load_grid(path)["sigmas"]
    want = generate(
        module,
        range(3),
        sampler={"name": "dpmpp_2m", "nfe": 4, "discretization": "learned", "sigmas": sigmas},
    )
    assert np.array_equal(got, to_uint8_rgb(want)[:, :1].permute(0, 2, 3, 1).numpy())
    karras = sample(_compose("sample", args, tmp_path / "b"))
    assert not np.array_equal(got, np.load(karras / "samples.npz")["samples"])
    given = sample(
        _compose("sample", [*args, "sampler.discretization=learned", f"sampler.sigmas_file={path}"], tmp_path / "c")
    )  # fmt: skip
    assert np.array_equal(got, np.load(given / "samples.npz")["samples"])


def test_a_grid_is_refused_for_another_sampler_nfe_or_checkpoint(fitted, tmp_path):
    ckpt, path = fitted
    base = [f"ckpt={ckpt}", "num_samples=2", "sampler.discretization=learned"]

    def sample_error(*args: str) -> str:
        return _message(lambda: sample(_compose("sample", [*base, *args], tmp_path)))

    msg = sample_error("sampler=heun", "sampler.nfe=4", f"sampler.sigmas_file={path}")
    assert "was fitted for sampler=dpmpp_2m nfe=4" in msg and "sampler=heun nfe=4" in msg
    msg = sample_error("sampler=dpmpp_2m", "sampler.nfe=5", f"sampler.sigmas_file={path}")
    assert "was fitted for sampler=dpmpp_2m nfe=4" in msg and "dl-fit-sigmas" in msg
    msg = sample_error("sampler=dpmpp_2m", "sampler.nfe=5")
    assert "no grid for sampler=dpmpp_2m nfe=5 at" in msg and "dpmpp_2m_nfe5.json" in msg
    other = tmp_path / "other" / "last.ckpt"
    other.parent.mkdir()
    shutil.copy(ckpt, other)
    with open(other, "ab") as f:
        f.write(b"\0")
    msg = _message(
        lambda: resolve_sampler(
            {"name": "dpmpp_2m", "nfe": 4, "discretization": "learned", "sigmas_file": str(path)},
            other,
        )
    )
    assert "fitted for another checkpoint" in msg
    msg = sample_error(
        "sampler=dpmpp_2m",
        "sampler.nfe=4",
        "sampler.discretization=karras",
        f"sampler.sigmas_file={path}",
    )
    assert "sampler.sigmas_file is read only with sampler.discretization=learned" in msg
    assert "no such grid file" in sample_error("sampler.sigmas_file=/nonexistent.json")


def test_fit_grid_refuses_stochastic_samplers_and_bad_settings(fitted):
    ckpt, _ = fitted

    def fit_error(*args: str) -> str:
        return _message(lambda: fit_grid(_compose("fit_grid", [f"ckpt={ckpt}", *FIT, *args])))

    assert "needs a deterministic sampler" in fit_error("sampler=euler_ancestral")
    assert "fit.steps=-1 must be >= 0" in fit_error("fit.steps=-1")
    assert "fit.dtype='float16'" in fit_error("fit.dtype=float16")
    assert "ckpt=... is required" in _message(lambda: fit_grid(_compose("fit_grid", FIT)))


def test_training_callbacks_sample_with_a_learned_grid(fitted, tmp_path):
    _, path = fitted
    sampler = ["sampler=dpmpp_2m", "sampler.nfe=4", "sampler.discretization=learned"]
    overrides = [
        *fast_overrides(tmp_path),
        "trainer.max_steps=1",
        *sampler,
        f"sampler.sigmas_file={path}",
    ]
    train(compose_train(overrides, tmp_path))
    state = torch.load(
        tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert state["hyper_parameters"]["sampler"]["sigmas"] == load_grid(path)["sigmas"]
    assert any((tmp_path / "samples").glob("step_*.png"))
    msg = _message(lambda: train(compose_train([*fast_overrides(tmp_path), *sampler], tmp_path)))
    assert "sampler.discretization=learned needs sampler.sigmas_file=<file>" in msg


def test_sigterm_stops_the_fit_within_one_network_evaluation(fitted, tmp_path):
    """A teacher of a million steps (a stand-in for a long fit): SIGTERM, sent once the stop
    handler is in place, ends dl-fit-grid at its next network evaluation with its line, status
    143 and no grid file."""
    ckpt, _ = fitted
    out = tmp_path / "grid.json"
    cfg = _compose(
        "fit_grid",
        [f"ckpt={ckpt}", "sampler.nfe=4", *FIT, "fit.teacher_nfe=1000000", f"dest={out}"],
    )
    default = signal.getsignal(signal.SIGTERM)
    sent: list[float] = []

    def send() -> None:  # only once fit_grid's handler is installed: never SIGTERM to pytest
        while signal.getsignal(signal.SIGTERM) is default:
            time.sleep(0.01)
        time.sleep(0.5)
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send, daemon=True).start()
    with pytest.raises(Stopped) as e:
        fit_grid(cfg)
    assert time.monotonic() - sent[0] < 10
    assert e.value.exit_code == 143
    assert str(e.value).startswith("SIGTERM: stopped fitting the grid of sampler=dpmpp_2m nfe=4")
    assert not out.exists() and signal.getsignal(signal.SIGTERM) is default
