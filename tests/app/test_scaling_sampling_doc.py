"""Every command of docs/scaling.md's sampling sections runs as written (tiny checkpoint, fewer
images and steps): torchrun on one node and on two "nodes", the multi-node images equal to the
one-node ones; each SLURM script under a stand-in ``srun`` with 2 tasks, stopped by SLURM's
SIGUSR1, requeued through ``scontrol`` and run again as the requeued job, which continues and
ends equal to the uninterrupted torchrun run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sampling.tiny import tiny_ckpt

from .helpers import ROOT

DOC = ROOT / "docs" / "scaling.md"
BIN = Path(sys.executable).parent
CKPT = "logs/train/runs/my_run/checkpoints/last.ckpt"
N = 24  # images instead of 50,000

# the settings the doc leaves at their defaults, made small (added after the doc's own)
SAMPLE = ["sampler=euler_ancestral", "sampler.nfe=4", "batch_size=3", "device=cpu"]
EVALUATE = [
    "dataset=digits",
    "sampler=euler_ancestral",
    "sampler.nfe=4",
    "eval.batch_size=4",
    "eval.extractor_steps=30",
    "eval.metrics=[fid,kid]",
    "eval.cache_dir=cache",
    "device=cpu",
]

SRUN = """#!{python}
import os, signal, subprocess, sys

with open(os.environ["FAKE_SRUN_PID"], "w") as f:
    f.write(str(os.getpid()))
tasks = []


def forward(signum, frame):  # srun passes the signals it gets on to every task
    for t in tasks:
        t.send_signal(signum)


for s in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(s, forward)
for i in range(int(os.environ["SLURM_NTASKS"])):
    env = {{**os.environ, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i), "SLURM_NODEID": "0"}}
    tasks.append(subprocess.Popen(sys.argv[1:], env=env))
codes = [t.wait() for t in tasks]
sys.exit(next((c for c in codes if c), 0))
"""


def _blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)


def _commands(block: str) -> list[str]:
    return [ln for ln in block.splitlines() if ln and not ln.startswith("#")]


def test_every_scaling_doc_command_is_run_by_a_doc_test():
    """train.py commands are test_scaling_doc.py's, sample.py / evaluate.py ones this file's."""
    commands = [c for b in _blocks() for c in _commands(b)]
    assert commands
    for c in commands:
        assert re.search(r"\b(train|sample|evaluate)\.py\b", c), c
    apps = [c for c in commands if "sample.py" in c or "evaluate.py" in c]
    assert sum(c.startswith("torchrun") for c in apps) == 4
    assert sum(c.startswith("srun") for c in apps) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _small(line: str, port: int) -> str:
    """The doc's command with fewer images and small settings."""
    cmd = line.rstrip("& ").replace("python ", f"{sys.executable} ", 1)
    cmd = cmd.replace("--master_port=29500", f"--master_port={port}")
    cmd = cmd.replace("seeds=0-49999", f"seeds=0-{N - 1}")
    cmd = cmd.replace("eval.num_samples=50000", f"eval.num_samples={N}")
    return " ".join([cmd, *(EVALUATE if "evaluate.py" in cmd else SAMPLE)])


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("0*.png"))}


def _wait(found, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if found():
            return
        time.sleep(0.05)
    raise AssertionError(f"never came:\n{proc.communicate()[0][-3000:]}")


@pytest.mark.slow
def test_every_sampling_command_of_the_scaling_doc_runs(tmp_path):
    shutil.copy(tiny_ckpt(tmp_path / "tiny", label_dim=10), tmp_path / "ckpt")
    (tmp_path / CKPT).parent.mkdir(parents=True)
    (tmp_path / "ckpt").rename(tmp_path / CKPT)
    for app in ("sample.py", "evaluate.py"):
        (tmp_path / app).symlink_to(ROOT / app)
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    port = _free_port()

    def run(cmd: str, extra_env: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen(
            cmd,
            shell=True,
            cwd=tmp_path,
            env={**env, **(extra_env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    blocks = _blocks()
    torchrun = next(b for b in blocks if "torchrun --standalone" in b and "sample.py" in b)
    first = None
    for line in _commands(torchrun):
        proc = run(_small(line, port))
        if line.endswith("&"):
            first = proc
            continue
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, f"{line}\n{out[-3000:]}"
        if "--node_rank=1" in line:
            assert first.wait(timeout=300) == 0, first.communicate()[0][-3000:]
    one_node = _pngs(tmp_path / "out" / "my_run_50k")
    assert len(one_node) == N
    assert _pngs(tmp_path / "out" / "my_run_50k_nodes") == one_node  # 2 nodes = 1 node
    metrics = json.loads((tmp_path / "logs/evaluate/runs/my_run_50k/metrics.json").read_text())
    assert set(metrics["metrics"]) == {"fid", "kid_mean", "kid_std"}

    # SLURM: each script under a stand-in srun (2 tasks), stopped by SIGUSR1 once something is
    # written, requeued by rank 0 through scontrol, and run again as the requeued job
    fake = tmp_path / "slurm_bin"
    fake.mkdir()
    calls = tmp_path / "scontrol.calls"
    (fake / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (fake / "srun").write_text(SRUN.format(python=sys.executable))
    for f in fake.iterdir():
        f.chmod(0o755)
    slurm = {
        "PATH": f"{fake}{os.pathsep}{env['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "fid",
        "SLURM_NTASKS": "2",
        "SLURM_NODELIST": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "FAKE_SRUN_PID": str(tmp_path / "srun.pid"),
    }
    scripts = [b for b in blocks if "#SBATCH" in b]
    assert len(scripts) == 2 and all("--signal=USR1@120 --requeue" in b for b in scripts)
    for block in scripts:
        (line,) = _commands(block)
        job = tmp_path / "job.sh"
        job.write_text(f"#!/bin/bash\n{block.replace(line, _small(line, port))}")
        if "sample.py" in line:
            out = tmp_path / "out" / "my_run_50k_slurm"
            written = lambda out=out: len(list(out.glob("0*.png"))) >= 6  # noqa: E731
        else:
            kept = tmp_path / "logs/evaluate/slurm_4242/generated_features"
            written = lambda kept=kept: len(list(kept.glob("*/*.pt"))) >= 2  # noqa: E731
        calls.unlink(missing_ok=True)
        proc = run(f"bash {job}", slurm)
        _wait(written, proc)
        os.kill(int((tmp_path / "srun.pid").read_text()), signal.SIGUSR1)
        log = proc.communicate(timeout=300)[0]
        assert proc.returncode == 138, log[-3000:]  # 128 + SIGUSR1
        assert "requeued SLURM job 4242" in log and "Traceback" not in log, log[-3000:]
        assert calls.read_text().split() == ["requeue", "4242"]
        proc = run(f"bash {job}", slurm)  # the requeued job
        log = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, log[-3000:]
        if "sample.py" in line:
            assert re.search(r"made \d+ images \(\d+ \+ \d+\), \d+ already written were skip", log)
            assert _pngs(out) == one_node
        else:
            assert re.search(
                r"sampling: [1-9]\d* of 24 samples' features kept from an earlier", log
            )
            again = json.loads((kept.parent / "metrics.json").read_text())["metrics"]
            for k, v in metrics["metrics"].items():
                assert again[k] == pytest.approx(v, rel=1e-6, abs=1e-12), k
            assert not kept.exists()
