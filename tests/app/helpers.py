"""Shared helpers for tests that run the real Hydra apps."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from diffusionlab.config import CONF_DIR, project_root

ROOT = project_root()


def fast_overrides(tmp_path: Path, callbacks: bool = True) -> list[str]:
    """A few optimizer steps of a tiny model on the 8x8 digits, nothing sent to W&B.

    ``callbacks=False`` drops checkpoints and sample grids (``callbacks=none``)."""
    cb = [
        "~callbacks.rich_progress_bar",
        "callbacks.sample_grid.num_samples=4",
        "callbacks.sample_grid.every_n_steps=0",
    ]
    return [
        "dataset=digits",
        "model=unet_tiny",
        "data.batch_size=16",
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=1",
        "trainer.enable_model_summary=false",
        "logger=csv",
        "sampler.nfe=3",
        f"paths.log_dir={tmp_path}",
        *(cb if callbacks else ["callbacks=none"]),
    ]


def compose_train(overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose ``conf/train.yaml`` as the app would, with the run dir set to ``output_dir``."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def run_app(
    script: str, args: list[str], timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python <script> <args>`` from the project root, as a user would; ``env`` adds to
    (or overrides) W&B disabled and Hydra's short errors."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        env={**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_two_nodes(args_of_rank: Callable[[int], list[str]], timeout: float = 300) -> list[str]:
    """Start ``train.py`` as two single-process 'nodes' on 127.0.0.1 (NODE_RANK 0 and 1, as
    torchrun or SLURM would) with ``args_of_rank(rank)``; both must exit 0. Returns their stderr."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        env |= {"NODE_RANK": str(rank), "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
        procs.append(
            subprocess.Popen(
                [sys.executable, str(ROOT / "train.py"), *args_of_rank(rank)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    errors = [p.communicate(timeout=timeout)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    return errors
