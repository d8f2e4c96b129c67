"""Training length in images (trainer.max_kimg, EDM's unit), the image count in logs and
checkpoints, and the 9-minute time guard of the default run that no other run gets."""

import csv

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from diffusionlab.cli.train import is_default_run, train, trainer_config
from diffusionlab.config import CONF_DIR
from diffusionlab.errors import ConfigError

from .helpers import compose_train, fast_overrides


def test_max_kimg_sets_the_steps_and_the_image_count_is_logged_and_saved(tmp_path):
    run = tmp_path / "run"
    overrides = [*fast_overrides(tmp_path), "trainer.max_steps=1000", "trainer.max_kimg=0.04"]
    train(compose_train(overrides, run))  # ceil(40 images / batch 16) = 3 steps
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 3 and state["images_seen"] == 48
    (metrics,) = run.rglob("metrics.csv")
    kimg = [float(r["train/kimg"]) for r in csv.DictReader(metrics.open()) if r.get("train/kimg")]
    assert kimg == pytest.approx([0.0, 0.016, 0.032])  # images before each logged step (float32)
    with pytest.raises(ConfigError, match="trainer.max_kimg"):
        trainer_config(compose_train([*overrides[:-1], "trainer.max_kimg=-1"], run), 16)


def _guard(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        cfg.paths.output_dir = "x"
        return is_default_run(cfg), trainer_config(cfg, 64).get("max_time")
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.parametrize(
    ("overrides", "guarded"),
    [
        ([], True),
        (["schedule=vp", "optimizer.lr=2e-3"], True),
        (["trainer=cpu"], False),
        (["dataset=image_folder", "dataset.path=faces", "model=unet_ddpmpp"], False),
        (["experiment=edm_mnist"], False),
        (["trainer.max_steps=100000"], False),
        (["trainer.max_time=00:01:00:00"], False),
    ],
)
def test_only_the_default_run_has_the_time_guard(overrides, guarded):
    default, max_time = _guard(overrides)
    assert default == guarded
    if guarded:
        assert max_time == "00:00:09:00"
    elif "trainer.max_time=00:01:00:00" in overrides:
        assert max_time == "00:01:00:00"
    else:
        assert max_time is None
    HydraConfig.instance().cfg = None
    assert not is_default_run(compose_train(overrides, "x"))  # no Hydra app: never guarded
