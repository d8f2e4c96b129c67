"""Atomic checkpoint writes (a SIGKILL mid-save keeps the previous file) and retention."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from diffusionlab.cli.train import train
from diffusionlab.errors import TrainingDiverged
from diffusionlab.training.checkpoint_io import AtomicCheckpointIO, read_checkpoint

from .helpers import ROOT, compose_train, fast_overrides


def test_kill_during_save_keeps_the_previous_last_ckpt(tmp_path):
    marker = tmp_path / "saving"
    io = f"{{_target_:slow_checkpoint_io.SlowCheckpointIO,from_step:4,marker:'{marker}'}}"
    args = [*fast_overrides(tmp_path), "trainer.max_steps=50", f"hydra.run.dir={tmp_path}/run"]
    args += ["callbacks.model_checkpoint.every_n_train_steps=2", f"trainer.plugins=[{io}]"]
    path = os.pathsep.join([str(ROOT / "tests" / "app"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", "PYTHONPATH": path}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert marker.exists(), err.decode()[-3000:]
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "last.ckpt.tmp").stat().st_size > 0  # the half-written new one
    assert read_checkpoint(ckpts / "last.ckpt", "ckpt")["global_step"] == 2
    assert read_checkpoint(ckpts / "step_000004.ckpt", "ckpt")["global_step"] == 4
    # the surviving checkpoint resumes
    resumed = [
        *fast_overrides(tmp_path),
        "trainer.max_steps=3",
        f"resume_ckpt={ckpts / 'last.ckpt'}",
    ]
    train(compose_train(resumed, tmp_path / "resumed"))
    assert read_checkpoint(tmp_path / "resumed/checkpoints/last.ckpt", "c")["global_step"] == 3


def test_retention_keeps_last_k_and_periodic(tmp_path):
    overrides = [*fast_overrides(tmp_path), "trainer.max_steps=7"]
    overrides += ["callbacks.model_checkpoint.every_n_train_steps=1"]
    overrides += ["callbacks.model_checkpoint.keep_last=2"]
    overrides += ["callbacks.model_checkpoint.keep_every_n_steps=3"]
    train(compose_train(overrides, tmp_path))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [
        "guide.ckpt",
        "last.ckpt",
        "step_000003.ckpt",
        "step_000006.ckpt",
        "step_000007.ckpt",
    ]


def test_last_ckpt_holds_the_final_step_between_periodic_saves(tmp_path):
    overrides = fast_overrides(tmp_path) + [
        "trainer.max_steps=5",
        "callbacks.model_checkpoint.every_n_train_steps=3",
    ]
    train(compose_train(overrides, tmp_path))
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "guide.ckpt",
        "last.ckpt",
        "step_000003.ckpt",
    ]
    assert read_checkpoint(ckpts / "last.ckpt", "resume_ckpt")["global_step"] == 5


def test_atomic_io_refuses_non_finite_weights(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, path)
    bad = {"state_dict": {"w": torch.tensor([1.0, float("nan")])}, "global_step": 2}
    with pytest.raises(TrainingDiverged, match="non-finite weights in w"):
        io.save_checkpoint(bad, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
