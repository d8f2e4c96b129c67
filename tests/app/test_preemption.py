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

from .helpers import ROOT, compose_train, fast_overrides, run_app


def _start(tmp_path, extra_env: dict[str, str] | None = None, run_dir: str = "run"):
    args = [
        *fast_overrides(tmp_path),
        "trainer.max_steps=100000",
        f"hydra.run.dir={tmp_path}/{run_dir}",
    ]
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
    train(compose_train([*resumed, f"resume_ckpt={ckpts / 'last.ckpt'}"], tmp_path / "b"))
    assert read_checkpoint(tmp_path / "b/checkpoints/last.ckpt", "c")["global_step"] == step + 2


SLURM_ENV = {
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_JOB_NAME": "train",
    "SLURM_JOB_ID": "4242",
    "SLURM_NODELIST": "127.0.0.1",
    "SLURM_NODEID": "0",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
}


def test_slurm_requeue_signal_writes_hpc_checkpoint_and_requeued_job_resumes(tmp_path):
    """Simulated SLURM job (no scontrol here, so the requeue call itself fails): SIGUSR1 goes to
    Lightning's auto-requeue handler, which writes hpc_ckpt_1.ckpt in the run directory; SIGTERM
    then saves last.ckpt and exits 0; the requeued job, run again in the same directory, resumes
    from the hpc checkpoint by itself."""
    run_dir = "slurm_${oc.env:SLURM_JOB_ID}"  # the same directory for the requeued job
    run = tmp_path / "slurm_4242"
    proc = _start(tmp_path, SLURM_ENV, run_dir)
    _wait_for(run / "checkpoints" / "step_000002.ckpt", proc)
    proc.send_signal(signal.SIGUSR1)
    _wait_for(run / "hpc_ckpt_1.ckpt", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: saved" in out and "Traceback" not in out
    hpc_step = read_checkpoint(run / "hpc_ckpt_1.ckpt", "ckpt")["global_step"]
    assert hpc_step >= 2

    args = [*fast_overrides(tmp_path), f"trainer.max_steps={hpc_step + 2}"]
    args.append(f"hydra.run.dir={tmp_path}/{run_dir}")
    res = run_app("train.py", args, env=SLURM_ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {run / 'hpc_ckpt_1.ckpt'}" in res.stderr
    last = read_checkpoint(run / "checkpoints" / "last.ckpt", "ckpt")
    assert last["global_step"] == hpc_step + 2
    assert not list(run.rglob("last-v*.ckpt"))
