"""Submitit launchers: the local one runs a real 2-job sweep; the SLURM one renders its sbatch file."""

from __future__ import annotations

import csv

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from submitit.slurm import slurm

from diffusionlab.config import CONF_DIR

from .helpers import fast_overrides, run_app


class _Submitted(Exception):
    """Raised instead of calling sbatch: carries the rendered submission file."""


def _render_sbatch(monkeypatch, tmp_path, overrides: list[str]) -> tuple[dict, str]:
    """The launcher's resolved parameters and the sbatch text of a 2-job array, not submitted."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}", *overrides],
            return_hydra_config=True,
        )
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg

    def submit(self, command):
        raise _Submitted(self._make_submission_file_text(command, "test"))

    monkeypatch.setattr(slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    monkeypatch.setattr(slurm.SlurmExecutor, "_submit_command", submit)
    with pytest.raises(_Submitted) as sent:
        launcher.launch([["optimizer.lr=1e-4"], ["optimizer.lr=2e-4"]], initial_job_idx=0)
    return launcher.params, str(sent.value)


def test_slurm_launcher_renders_nodes_gpus_tasks_and_requeue(monkeypatch, tmp_path):
    overrides = [
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=720",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
    ]
    params, sbatch = _render_sbatch(monkeypatch, tmp_path, overrides)
    assert params["nodes"] == 2 and params["gpus_per_node"] == 4 and params["tasks_per_node"] == 4
    assert params["max_num_timeout"] == 3 and params["signal_delay_s"] == 120
    lines = set(sbatch.splitlines())
    for line in [
        "#SBATCH --partition=gpu",
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --time=720",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --requeue",
        "#SBATCH --array=0-1%2",
        "#SBATCH --job-name=app",
    ]:
        assert line in lines, f"{line!r} not in\n{sbatch}"
    assert f"-m submitit.core._submit {tmp_path}/.submitit/%j" in sbatch
    assert any(line.startswith("srun ") for line in lines)


def test_slurm_launcher_follows_the_default_trainer(monkeypatch, tmp_path):
    """One node, one GPU, one task when the trainer asks for one device."""
    params, sbatch = _render_sbatch(monkeypatch, tmp_path, [])
    assert (params["nodes"], params["gpus_per_node"], params["tasks_per_node"]) == (1, 1, 1)
    assert "#SBATCH --gpus-per-node=1" in sbatch and "#SBATCH --ntasks-per-node=1" in sbatch
    assert not any(line.startswith("#SBATCH --partition") for line in sbatch.splitlines())


def test_local_launcher_runs_a_two_job_sweep(tmp_path):
    """Two submitit processes in parallel (about 20 s on 2 CPU cores)."""
    sweep = tmp_path / "sweep"
    args = ["-m", *fast_overrides(tmp_path, callbacks=False), "trainer.max_steps=2"]
    args += ["hydra/launcher=local", f"hydra.sweep.dir={sweep}", "optimizer.lr=1e-3,2e-3"]
    result = run_app("train.py", args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in result.stdout + result.stderr
    for job, lr in [("0", "0.001"), ("1", "0.002")]:
        assert f"optimizer.lr={lr}" in (sweep / job / ".hydra" / "overrides.yaml").read_text()
        with open(sweep / job / "metrics.csv") as f:
            losses = [r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")]
        assert len(losses) == 2
    # each job ran in its own submitit process, which left its logs and result pickle
    results = list((sweep / ".submitit").rglob("*_result.pkl"))
    assert len(results) == 2
