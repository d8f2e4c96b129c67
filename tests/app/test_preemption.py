"""SIGTERM / SIGUSR1 during train.py: last.ckpt at the step reached, exit 0, and the run resumes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from diffusionlab.cli.train import train
from diffusionlab.training.checkpoint_io import read_checkpoint

from .helpers import ROOT, compose_train, fast_overrides


def _start(tmp_path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    args = [*fast_overrides(tmp_path), "trainer.max_steps=100000", f"hydra.run.dir={tmp_path}/run"]
    args += ["callbacks.model_checkpoint.every_n_train_steps=2", "trainer.max_time=null"]
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", **(extra_env or {})}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(path, proc, timeout=120) -> None:
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert path.exists(), proc.stdout.read()[-3000:] if proc.poll() is not None else "timeout"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_last_ckpt_exits_zero_and_resumes(tmp_path, sig):
    proc = _start(tmp_path)
    ckpts = tmp_path / "run" / "checkpoints"
    _wait_for(ckpts / "step_000002.ckpt", proc)
    proc.send_signal(sig)
    err, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    saved = re.search(rf"{sig.name}: saved (\S+) at step (\d+); stopping", err)
    assert saved, err[-3000:]
    step = int(saved.group(2))
    assert saved.group(1) == str(ckpts / "last.ckpt") and step >= 2
    assert read_checkpoint(ckpts / "last.ckpt", "ckpt")["global_step"] == step
    resumed = [*fast_overrides(tmp_path), f"trainer.max_steps={step + 2}"]
    train(compose_train([*resumed, f"ckpt_path={ckpts / 'last.ckpt'}"], tmp_path / "b"))
    assert read_checkpoint(tmp_path / "b/checkpoints/last.ckpt", "c")["global_step"] == step + 2
