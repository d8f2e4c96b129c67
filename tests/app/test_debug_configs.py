"""lightning-hydra-template habits: debug= configs, an mps trainer, the config tree printed at
start (secrets redacted)."""

import pytest
from hydra import compose, initialize_config_dir

from diffusionlab.cli.train import print_config_tree
from diffusionlab.config import CONF_DIR

from .helpers import compose_train


def _compose(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize(
    ("name", "trainer"),
    [
        ("default", {"accelerator": "cpu", "detect_anomaly": True}),
        ("fdr", {"fast_dev_run": True}),
        ("limit", {"max_steps": 20, "log_every_n_steps": 1}),
        ("profiler", {"max_steps": 20, "profiler": "simple"}),
    ],
)
def test_debug_configs(name, trainer):
    cfg = _compose([f"debug={name}"])
    assert cfg.task_name == "debug" and cfg.wandb.mode == "disabled" and cfg.print_config
    assert {k: cfg.trainer[k] for k in trainer} == trainer


def test_mps_trainer():
    cfg = _compose(["trainer=mps"])
    assert cfg.trainer.accelerator == "mps" and cfg.trainer.devices == 1
    assert cfg.trainer.max_steps == 3000  # the rest of trainer/default.yaml


def test_config_tree_is_printed_without_secrets(tmp_path, capsys):
    cfg = compose_train(["+extra.api_key=cfgSECRETkey", "sampler.nfe=7"], tmp_path)
    print_config_tree(cfg)
    out = capsys.readouterr().out
    assert "sampler" in out and "nfe: 7" in out and "output_dir: /tmp" in out  # resolved
    assert "SECRET" not in out and "api_key" in out


@pytest.mark.parametrize("app", ["sample", "evaluate"])
def test_help_lists_the_apps_own_groups(app):
    """``sample.py --help`` / ``evaluate.py --help`` show their config and their groups, not
    every training group of conf/."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=app, return_hydra_config=True)
    template = cfg.hydra.help.template
    assert "$APP_CONFIG_GROUPS" not in template and "$CONFIG" in template
    assert "sampler=<name>" in template
