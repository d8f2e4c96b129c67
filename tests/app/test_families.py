"""The NCSN and iDDPM presets end to end: composing, training, the learned variance through the
apps, and every command of docs/families.md as written (tiny: digits, a few steps)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionlab.cli.train import build, train
from diffusionlab.errors import ConfigError
from diffusionlab.sampling.generator import generate

from .helpers import ROOT, compose_train, fast_overrides

DOC = ROOT / "docs" / "families.md"
IDDPM_TINY = ["schedule.num_steps=20", "sampler.nfe=5"]


def test_iddpm_mnist_trains_and_samples_with_its_learned_variance(tmp_path):
    cfg = compose_train(
        [*fast_overrides(tmp_path, callbacks=False), "experiment=iddpm_mnist", *IDDPM_TINY],
        tmp_path,
    )
    assert cfg.loss.vlb_weight == 0.001 and cfg.parameterization.learned_variance
    assert cfg.sampler.options.variance == "learned" and cfg.sampler.discretization == "linspace"
    metrics = train(cfg)
    assert np.isfinite(metrics["train/loss"])
    module, _ = build(cfg)
    d, v = module.ema.forward_with_variance(torch.zeros(2, 1, 8, 8), torch.ones(2))
    assert d.shape == v.shape == (2, 1, 8, 8)
    assert torch.isfinite(generate(module, range(2))).all()


def test_learned_variance_needs_twice_the_channels(tmp_path):
    overrides = [*fast_overrides(tmp_path, callbacks=False), "experiment=iddpm_mnist"]
    with pytest.raises(ConfigError, match="model.out_channels = 2 x 1"):
        build(compose_train([*overrides, "model.out_channels=1"], tmp_path))
    with pytest.raises(ConfigError, match="learned_variance"):
        build(compose_train([*overrides, "parameterization.learned_variance=false"], tmp_path))


def test_ncsn_mnist_preset(tmp_path):
    cfg = compose_train(
        [*fast_overrides(tmp_path, callbacks=False), "experiment=ncsn_mnist", "sampler.nfe=5"]
        + ["sampler.options.steps_per_level=2"],
        tmp_path,
    )
    assert cfg.schedule.geometric and cfg.loss.weighting._target_.endswith("SNRWeighting")
    assert np.isfinite(train(cfg)["train/loss"])
    module, _ = build(cfg)
    assert module.schedule.sigma_max == pytest.approx(20.0)
    assert torch.isfinite(generate(module, range(2))).all()


def test_iddpm_cifar10_preset_trains_on_synthetic_32x32_rgb(tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
    cfg = compose_train(["experiment=iddpm_cifar10"], tmp_path)
    assert (cfg.schedule.num_steps, cfg.optimizer.lr, cfg.data.batch_size) == (4000, 1e-4, 128)
    assert (cfg.model.model_channels, cfg.model.num_blocks, cfg.model.dropout) == (128, 3, 0.3)
    assert cfg.model.out_channels == 6 and cfg.trainer.max_steps == 500000
    tiny = [
        "experiment=iddpm_cifar10",
        "trainer=default",
        "dataset=image_folder",
        f"dataset.path={data}",
        "model.model_channels=16",
        "model.channel_mult=[1,2]",
        "model.num_blocks=1",
        "model.attn_resolutions=[16]",
        "data.batch_size=4",
        "data.num_workers=0",
        "trainer.max_steps=2",
        "trainer.enable_model_summary=false",
        "logger=csv",
        "~callbacks.rich_progress_bar",
        "callbacks.sample_grid.every_n_steps=0",
        "callbacks.sample_grid.num_samples=2",
        "sampler.nfe=4",  # the end-of-training grid; the preset samples with all 4,000 steps
        f"paths.log_dir={tmp_path}",
    ]
    assert np.isfinite(train(compose_train(tiny, tmp_path))["train/loss"])


def _commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    return [line for b in blocks for line in b.splitlines() if line and not line.startswith("#")]


@pytest.mark.slow
def test_every_families_doc_command_runs(tmp_path):
    """The docs' commands, each with overrides appended that make it tiny; the evaluate command
    reports FID and the iDDPM bits/dim of its variational bound."""
    (tmp_path / "train.py").symlink_to(ROOT / "train.py")
    (tmp_path / "sample.py").symlink_to(ROOT / "sample.py")
    (tmp_path / "evaluate.py").symlink_to(ROOT / "evaluate.py")
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    train_extra = [
        "dataset=digits",
        "trainer.max_steps=2",
        "trainer.enable_model_summary=false",
        "logger=csv",
        "~callbacks.rich_progress_bar",
        "~callbacks.sample_grid",
        "sampler.nfe=5",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    ncsn_extra = ["sampler.options.steps_per_level=2"]
    iddpm_extra = ["schedule.num_steps=20"]  # T = 20 keeps the bound cheap
    sample_extra = ["sampler.nfe=5", "num_samples=4"]
    eval_extra = [
        "sampler.nfe=5",
        "eval.num_samples=20",
        "eval.extractor_steps=20",
        f"eval.cache_dir={tmp_path / 'cache'}",
        "bpd.num_images=4",
        "bpd.batch_size=2",
        f"hydra.run.dir={tmp_path / 'eval'}",
    ]
    for line in _commands():
        cmd = line.replace("python ", f"{sys.executable} ", 1)
        family = ncsn_extra if "ncsn" in line else iddpm_extra
        if "train.py" in line:
            extra = train_extra + family
        elif "sample.py" in line:
            extra = sample_extra + (ncsn_extra if "ncsn" in line else [])
        else:
            extra = eval_extra
        res = subprocess.run(
            f"{cmd} {' '.join(extra)}",
            shell=True,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert res.returncode == 0, f"{line}\n{res.stderr[-3000:]}"
    assert len(list((tmp_path / "runs" / "ncsn" / "samples").glob("0*.png"))) == 4
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert result["metrics"]["fid"] > 0
    # a bound in bits/dim: positive and finite; the prior term of 8-bit data is tiny at T = 20
    assert 0 < result["bpd"]["bpd"] < 100 and result["bpd"]["nfe_mean"] == 20
