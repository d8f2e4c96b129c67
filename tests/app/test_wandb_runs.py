"""W&B runs as a user sees them, read back from the offline run files the apps write."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusionlab.training.wandb_records import offline_runs

from .helpers import ROOT, fast_overrides


def run_offline(script: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """``python <script> <args>`` with W&B offline and every W&B directory inside ``tmp_path``."""
    wandb_home = tmp_path / "wandb_home"
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", "WANDB_SILENT": "true"}
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        env[var] = str(wandb_home)
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def wandb_overrides(tmp_path: Path) -> list[str]:
    return [*fast_overrides(tmp_path), "logger=wandb"]


def test_multirun_makes_one_named_run_per_job_in_one_group(tmp_path):
    args = ["-m", "schedule=vp,edm", "parameterization=eps,v", *wandb_overrides(tmp_path)]
    res = run_offline("train.py", [*args, "tags=[grid,digits]"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "already in progress" not in res.stderr
    (sweep,) = (tmp_path / "train" / "multiruns").iterdir()
    runs = offline_runs(sweep)
    assert len({r.id for r in runs}) == 4
    # each job's files stay in its own run directory
    assert sorted(r.dir.parent.parent.name for r in runs) == ["0", "1", "2", "3"]
    assert sorted(r.name for r in runs) == sorted(
        f"schedule={s},parameterization={p}" for s in ("vp", "edm") for p in ("eps", "v")
    )
    for run in runs:
        assert run.group == sweep.name and run.job_type == "train"
        assert run.tags == ["grid", "digits"] and run.exit_code == 0
        schedule, parameterization = (kv.split("=")[1] for kv in run.name.split(","))
        assert run.config["schedule"] == schedule
        assert run.config["parameterization"] == parameterization
        assert run.config["sampler"] == "heun" and run.config["dataset"] == "digits"
        assert run.config["schedule_cfg"]["_target_"].endswith(
            "VPSchedule" if schedule == "vp" else "EDMSchedule"
        )
        assert run.config["trainer_cfg"]["max_steps"] == 3 and run.config["seed"] == 42
        steps = [h["trainer/global_step"] for h in run.history if "train/loss" in h]
        assert steps == [0, 1, 2]
        assert [h["trainer/global_step"] for h in run.history if "train/lr" in h] == [0, 1, 2]
        # throughput every log_every_n_steps=1 step: images/s x s/step = images per step
        perf = [h for h in run.history if "perf/images_per_sec" in h]
        assert [h["trainer/global_step"] for h in perf] == [1, 2, 3]
        for row in perf:
            assert row["perf/images_per_sec"] * row["perf/step_time_s"] == pytest.approx(16)
            assert "perf/gpu_peak_mem_gb" not in row  # CPU run
        # the final sample grid: an image at the last step, its file in the run
        (grid,) = [h for h in run.history if "samples/grid/_type" in h]
        assert grid["trainer/global_step"] == 3 and grid["samples/grid/_type"] == "images/separated"
        (png,) = grid["samples/grid/filenames"]
        assert (run.dir / "files" / png).is_file()
