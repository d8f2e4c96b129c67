"""sample.py and evaluate.py on 2 CPU processes (gloo), started as users start them (torchrun,
srun's environment, Hydra's submitit launcher): the same files and metrics as one process; a stop
signal ends every process within one batch and the rerun writes only what is missing; SLURM's
requeue signal requeues the job, which then continues; train.py's end-of-training grid stops."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from diffusionlab.cli.evaluate import evaluate
from diffusionlab.cli.sample import sample
from diffusionlab.config import CONF_DIR
from diffusionlab.training.checkpoint_io import read_checkpoint
from sampling.tiny import tiny_ckpt

from .helpers import ROOT, fast_overrides

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
ENV = {"WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_ckpt(tmp_path_factory.mktemp("tiny"), label_dim=10)


def _args(ckpt: Path, outdir: Path, n: int, nfe: int = 12, batch: int = 2) -> list[str]:
    return [
        f"ckpt={ckpt}",
        "sampler=euler_ancestral",  # noise at every step: the per-seed streams matter
        f"sampler.nfe={nfe}",
        f"num_samples={n}",
        f"batch_size={batch}",
        "npz=true",
        "device=cpu",
        f"outdir={outdir}",
        f"paths.log_dir={outdir.parent / 'logs'}",
    ]


def _sample(args: list[str], outdir: Path) -> None:
    """sample.py in this process (one process)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("sample", [*args, "wandb.mode=disabled", f"paths.output_dir={outdir}"])
    sample(cfg)


def _popen(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, **ENV, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    """``cmd`` run to its end from the repository root; it must succeed."""
    res = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def _same_folders(a: Path, b: Path) -> None:
    assert _pngs(a) == _pngs(b)  # every image and grid.png, byte for byte
    na, nb = np.load(a / "samples.npz"), np.load(b / "samples.npz")
    assert set(na) == set(nb) == {"seeds", "samples", "labels"}
    for k in na:
        np.testing.assert_array_equal(na[k], nb[k])


def _wait_for_files(folder: Path, count: int, proc: subprocess.Popen, timeout=240) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        have = len(list(folder.glob("0*.png")))
        if have >= count:
            return have
        time.sleep(0.05)
    raise AssertionError(f"{count} images never appeared:\n{proc.communicate()[0][-3000:]}")


def test_torchrun_sigterm_stops_within_a_batch_and_the_rerun_completes_the_run(ckpt, tmp_path):
    """torchrun --standalone --nproc_per_node=2 sample.py: SIGTERM to torchrun (as a scheduler or
    Ctrl-C sends it) stops both processes within one batch with one line and a non-zero status;
    the rerun (one process) skips the images written and makes the others; every file then equals
    an uninterrupted one-process run: the 2-process images are those of 1 process."""
    n, batch = 40, 2
    out = tmp_path / "out"
    proc = _popen(
        [TORCHRUN, "--standalone", "--nproc_per_node=2", "sample.py", *_args(ckpt, out, n)]
    )
    before = _wait_for_files(out, 6, proc)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    stop = re.search(r"SIGTERM: stopped with (\d+) of 40 images in \S+ \(2 processes made", log)
    assert stop, log[-3000:]
    written = int(stop.group(1))
    assert len(list(out.glob("0*.png"))) == written and not list(out.glob("*.tmp"))
    assert before <= written <= before + 2 * batch and written < n  # within one batch each
    assert not (out / "grid.png").exists() and not (out / "samples.npz").exists()

    _sample(_args(ckpt, out, n), out)
    assert len(list(out.glob("0*.png"))) == n
    whole = tmp_path / "whole"
    _sample(_args(ckpt, whole, n, batch=8), whole)
    _same_folders(out, whole)


@pytest.mark.slow
def test_torchrun_two_processes_write_the_files_of_one(ckpt, tmp_path):
    """A whole 2-process run: rank 0 builds grid.png and samples.npz from both processes' files;
    one run directory with rank 0's .hydra/ and a log file per process."""
    out = tmp_path / "two"
    args = _args(ckpt, out, 10)
    res = _run([TORCHRUN, "--standalone", "--nproc_per_node=2", "sample.py", *args])
    assert "2 processes made 10 images (5 + 5), 0 already written were skipped" in res.stdout
    one = tmp_path / "one"
    _sample(_args(ckpt, one, 10), one)
    _same_folders(out, one)
    (run,) = (tmp_path / "logs" / "sample" / "runs").iterdir()
    assert {p.name for p in run.iterdir()} == {".hydra", "sample.log", "sample_rank1.log"}


def _slurm_env(rank: int, port: int, scontrol_dir: Path) -> dict[str, str]:
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "sample",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "127.0.0.1",
        "MASTER_PORT": str(port),
        "PATH": f"{scontrol_dir}{os.pathsep}{os.environ['PATH']}",
    }


@pytest.mark.slow
def test_srun_tasks_requeue_on_sigusr1_and_the_requeued_job_continues(ckpt, tmp_path):
    """Two tasks as srun starts them (SLURM_* environment, no torchrun): SLURM's requeue signal
    SIGUSR1 stops both within one batch and rank 0 calls `scontrol requeue 4242`; the requeued
    job (the same command) skips what was written and ends equal to one uninterrupted run."""
    calls = tmp_path / "scontrol.calls"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def job() -> list[subprocess.Popen]:
        return [
            _popen(
                [sys.executable, "sample.py", *_args(ckpt, out, 40)],
                _slurm_env(r, port, fake.parent),
            )
            for r in (0, 1)
        ]

    tasks = job()
    _wait_for_files(out, 6, tasks[0])
    for t in tasks:  # SLURM signals every task of the step
        t.send_signal(signal.SIGUSR1)
    logs = [t.communicate(timeout=120)[0] for t in tasks]
    assert [t.returncode for t in tasks] == [138, 138], logs[0][-2000:]
    assert "requeued SLURM job 4242" in logs[0] and "SIGUSR1: stopped with" in logs[0]
    assert "SIGUSR1" not in logs[1]  # the line is rank 0's alone
    assert calls.read_text().split() == ["requeue", "4242"]
    written = len(list(out.glob("0*.png")))
    tasks = job()  # the requeued job: the same command, the same environment
    logs = [t.communicate(timeout=300)[0] for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], logs[0][-3000:]
    assert f"{written} already written were skipped" in logs[0]
    whole = tmp_path / "whole"
    _sample(_args(ckpt, whole, 40), whole)
    _same_folders(out, whole)


@pytest.mark.slow
def test_submitit_launcher_with_two_tasks_per_node(ckpt, tmp_path):
    """Hydra's submitit launcher (its local executor) with tasks_per_node=2: one job, two tasks
    sharing the seeds, the images of one process."""
    out = tmp_path / "out"
    args = [
        "-m",
        "hydra/launcher=local",
        "hydra.launcher.tasks_per_node=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        *_args(ckpt, out, 10),
    ]
    _run([sys.executable, "sample.py", *args])
    logs = "".join(p.read_text() for p in (tmp_path / "sweep").rglob("*_log.*"))
    assert "2 processes made 10 images (5 + 5)" in logs, logs[-3000:]
    one = tmp_path / "one"
    _sample(_args(ckpt, one, 10), one)
    _same_folders(out, one)


def _eval_args(ckpt: Path, run: Path, cache: Path) -> list[str]:
    return [
        f"ckpt={ckpt}",
        "dataset=digits",
        "sampler=euler_ancestral",
        "sampler.nfe=12",
        "eval.num_samples=40",
        "eval.batch_size=10",
        "eval.extractor_steps=30",
        "eval.metrics=[fid,kid,prc,isc]",
        f"eval.cache_dir={cache}",
        "device=cpu",
        f"paths.log_dir={run.parent}",
        f"hydra.run.dir={run}",
    ]


@pytest.mark.slow
def test_torchrun_evaluate_gives_the_metrics_of_one_process(ckpt, tmp_path):
    """FID, KID, IS and precision/recall of 2 processes (features gathered to every rank) equal
    one process's (relative difference <= 1e-6); rank 0 alone writes metrics.json; the
    features kept during the run are gone once it has finished."""
    cache = tmp_path / "cache"
    one_dir = tmp_path / "one"
    args = _eval_args(ckpt, one_dir, cache)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "evaluate", [*args[:-1], "wandb.mode=disabled", f"paths.output_dir={one_dir}"]
        )
    one = evaluate(cfg)["metrics"]  # trains the domain extractor and caches the reference
    two_dir = tmp_path / "two"
    _run(
        [
            TORCHRUN,
            "--standalone",
            "--nproc_per_node=2",
            "evaluate.py",
            *_eval_args(ckpt, two_dir, cache),
        ]
    )
    two = json.loads((two_dir / "metrics.json").read_text())["metrics"]
    assert set(two) == set(one)
    for k in one:
        assert two[k] == pytest.approx(one[k], rel=1e-6, abs=1e-12), k
    assert not (two_dir / "generated_features").exists()


def test_sigterm_during_the_end_of_training_grid_ends_train_py(tmp_path):
    """The end-of-training sample grid with a sampler of a million steps (a slow stand-in for a
    large model on CPU): SIGTERM ends train.py within seconds, with one line, status 143, no grid
    file, and last.ckpt holding the final step."""
    run = tmp_path / "run"
    args = [
        *fast_overrides(tmp_path),
        "sampler=euler",
        "sampler.nfe=1000000",
        "callbacks.sample_grid.guidance=1",
        f"hydra.run.dir={run}",
    ]
    proc = _popen([sys.executable, "train.py", *args])
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "end of training (step 3): sample grid" in line:
            break
    assert proc.poll() is None, "".join(lines)[-3000:]
    time.sleep(1.0)  # well inside the grid
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    took = time.monotonic() - start
    assert proc.returncode == 143, rest[-3000:]
    assert "SIGTERM: stopped the work after the last step (final sample grid / FID)" in rest
    assert "Traceback" not in rest
    assert took < 60  # the grid itself would take hours
    assert not list(run.rglob("step_*.png"))
    assert read_checkpoint(run / "checkpoints" / "last.ckpt", "ckpt")["global_step"] == 3
    assert not list(run.rglob("*.tmp"))
