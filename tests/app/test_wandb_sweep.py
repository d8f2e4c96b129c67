"""The W&B Sweeps example: its parameters and fixed arguments are valid Hydra overrides of train.py."""

from __future__ import annotations

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from diffusionlab.config import CONF_DIR

from .helpers import ROOT

SWEEP = ROOT / "docs" / "wandb_sweep.yaml"


def test_wandb_sweep_command_passes_hydra_overrides():
    spec = yaml.safe_load(SWEEP.read_text())
    assert (ROOT / spec["program"]).is_file()
    command = spec["command"]
    assert command[:3] == ["${env}", "python", "${program}"] and command[-1] == "${args_no_hyphens}"
    fixed = command[3:-1]
    # one value per parameter, spelled as the agent spells it: key=value
    values = {}
    for key, p in spec["parameters"].items():
        values[key] = p["values"][0] if "values" in p else p["min"]
    sampled = [f"{k}={v}" for k, v in values.items()]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*fixed, *sampled])
    for key, value in values.items():
        assert OmegaConf.select(cfg, key, throw_on_missing=True) == value, key
    # the metric W&B optimises is the one the FID callback logs and the Optuna preset optimises
    preset = yaml.safe_load((ROOT / "conf" / "hparams_search" / "mnist_optuna.yaml").read_text())
    assert spec["metric"]["name"] == preset["optimized_metric"] == "eval/fid"
    assert cfg.callbacks.fid.every_n_steps == cfg.trainer.max_steps
    assert set(spec["parameters"]) == set(preset["hydra"]["sweeper"]["params"])
