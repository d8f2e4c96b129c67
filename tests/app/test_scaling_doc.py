"""Every command in docs/scaling.md runs as written (tiny: digits, unet_tiny, 2 steps)."""

import csv
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .helpers import ROOT

DOC = ROOT / "docs" / "scaling.md"


def _commands() -> list[str]:
    """The train.py commands (sample.py / evaluate.py ones: test_scaling_sampling_doc.py)."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    lines = [line for b in blocks for line in b.splitlines()]
    return [line for line in lines if line and not line.startswith("#") and "train.py" in line]


def _tiny(log_dir: Path, steps: int) -> str:
    return " ".join(
        [
            "dataset=digits",
            "model=unet_tiny",
            f"trainer.max_steps={steps}",
            "trainer.enable_model_summary=false",
            "trainer.log_every_n_steps=1",
            "logger=csv",
            "~callbacks.rich_progress_bar",
            "~callbacks.sample_grid",
            "callbacks.model_checkpoint.every_n_train_steps=1",
            f"paths.log_dir={log_dir}",
        ]
    )


@pytest.mark.slow
def test_every_scaling_doc_command_runs(tmp_path):
    commands = _commands()
    assert any(c.startswith("torchrun") for c in commands) and any(
        "NODE_RANK" in c for c in commands
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "train.py").symlink_to(ROOT / "train.py")
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"

    def command(line: str, steps: int) -> str:
        cmd = line.rstrip("& ").replace("python ", f"{sys.executable} ", 1)
        cmd = cmd.replace("MASTER_PORT=29500", f"MASTER_PORT={port}")
        return f"{cmd} {_tiny(tmp_path / 'logs', steps)}"

    def run(cmd: str) -> None:
        res = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert res.returncode == 0, f"{cmd}\n{res.stderr[-3000:]}"

    for line in commands:
        # a resumed run needs more steps than the checkpoint it starts from
        cmd = command(line, 4 if "resume_ckpt" in line or "auto_resume" in line else 2)
        if line.endswith("&"):
            first = subprocess.Popen(cmd, shell=True, cwd=tmp_path, env=env)
            continue
        run(cmd)
        if "NODE_RANK=1" in line:
            assert first.wait(timeout=300) == 0, line
    # the auto-resume command again, as after a crash: it goes on from step 4
    run(command(next(c for c in commands if "auto_resume" in c), 6))
    my_run = tmp_path / "logs" / "train" / "runs" / "my_run"
    ckpt = torch.load(my_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6
    with open(my_run / "metrics.csv") as f:
        steps = {int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")}
    assert sorted(steps) == [4, 5]  # the CSV logger starts a new file; not restarted at 0
