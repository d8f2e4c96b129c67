"""Optuna presets: a real search on the toy 2-D set writes its best parameters; presets compose."""

from __future__ import annotations

import csv

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from diffusionlab.cli.objective import optimized_value
from diffusionlab.config import CONF_DIR
from diffusionlab.errors import ConfigError

from .helpers import run_app


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def _last_loss(job_dir) -> float:
    with open(job_dir / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")][-1]


def test_toy2d_optuna_search_writes_best_params(tmp_path):
    sweep = tmp_path / "search"
    args = [
        "hparams_search=toy2d_optuna",
        "model=mlp_tiny",
        "data.batch_size=64",
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=1",
        "trainer.enable_model_summary=false",
        "logger=csv",
        "~callbacks.rich_progress_bar",
        "~callbacks.model_checkpoint",
        "callbacks.sample_grid.num_samples=16",
        "callbacks.sample_grid.every_n_steps=0",
        "sampler.nfe=2",
        f"paths.log_dir={tmp_path}",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweeper.n_trials=3",
    ]
    result = run_app("train.py", args)
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"optimizer.lr", "model.hidden_dim"}
    assert 1e-4 <= best["best_params"]["optimizer.lr"] <= 1e-2
    assert best["best_params"]["model.hidden_dim"] in (64, 128, 256)
    # the best value is the smallest final train/loss any trial logged, and the trial that
    # logged it ran with the best parameters
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 3
    losses = {job: _last_loss(job) for job in jobs}
    best_job = min(losses, key=losses.get)
    assert best["best_value"] == pytest.approx(losses[best_job], rel=1e-6)
    overrides = (best_job / ".hydra" / "overrides.yaml").read_text()
    assert f"model.hidden_dim={best['best_params']['model.hidden_dim']}" in overrides


def test_mnist_optuna_search_optimises_the_fid_callback_metric(tmp_path):
    """Two tiny trials of the MNIST preset: each returns the eval/fid its FID callback logged."""
    sweep = tmp_path / "search"
    args = [
        "hparams_search=mnist_optuna",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "hydra.sweeper.n_trials=2",
        "data.batch_size=16",
        "callbacks.fid.num_samples=20",
        "callbacks.fid.extractor_steps=10",
        "callbacks.fid.metrics=[fid]",
        "logger=csv",
        "~callbacks.rich_progress_bar",
        "~callbacks.model_checkpoint",
        "callbacks.sample_grid.num_samples=4",
        "callbacks.sample_grid.every_n_steps=0",
        "sampler.nfe=3",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.log_dir={tmp_path}",
        f"hydra.sweep.dir={sweep}",
    ]
    result = run_app("train.py", args)
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {
        "optimizer.lr",
        "ema.halflife_kimg",
        "parameterization.sigma_data",
    }
    fids = []
    for job in ("0", "1"):
        with open(sweep / job / "metrics.csv") as f:
            fids += [float(r["eval/fid"]) for r in csv.DictReader(f) if r.get("eval/fid")]
    assert len(fids) == 2 and best["best_value"] == pytest.approx(min(fids), rel=1e-6)


def test_mnist_optuna_preset_searches_lr_ema_sigma_data_on_fid():
    cfg = _compose(["hparams_search=mnist_optuna"])
    assert cfg.optimized_metric == "eval/fid"
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert set(cfg.hydra.sweeper.params) == {
        "optimizer.lr",
        "ema.halflife_kimg",
        "parameterization.sigma_data",
    }
    assert cfg.ema.halflife_kimg > 0  # the searched keys exist in the composed config
    assert cfg.parameterization.sigma_data == 0.5
    # FID once, at the last step, so train() returns it as eval/fid
    assert cfg.callbacks.fid.every_n_steps == cfg.trainer.max_steps == 3000
    cfg = _compose(["hparams_search=mnist_optuna", "experiment=edm_mnist"])
    assert cfg.callbacks.fid.every_n_steps == cfg.trainer.max_steps == 20000


def test_search_sweeper_gets_a_clear_error_for_a_metric_never_logged(monkeypatch):
    hc = HydraConfig.instance()
    monkeypatch.setattr(hc, "cfg", None)  # restored after the test
    hc.set_config(_compose(["hparams_search=toy2d_optuna", "optimized_metric=eval/fid"]))
    assert optimized_value({"train/loss": 0.25}, "train/loss") == 0.25
    with pytest.raises(
        ConfigError, match=r"optimized_metric='eval/fid' was not logged.*train/loss"
    ):
        optimized_value({"train/loss": 0.25}, "eval/fid")
    # a grid sweep (basic sweeper) or a single run only passes the value on
    hc.set_config(_compose(["hydra.mode=MULTIRUN"]))
    assert optimized_value({"train/loss": 0.25}, "eval/fid") is None
