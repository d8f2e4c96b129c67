"""LR schedules: closed-form values at given steps, the YAML groups, the optimizer's lr per step,
and an exact continuation after resuming."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from app.helpers import compose_train, fast_overrides
from diffusionlab.cli.train import build, train
from diffusionlab.config import CONF_DIR
from diffusionlab.errors import ConfigError
from diffusionlab.training.lr_schedules import Constant, Cosine, InverseSqrt, build_lr_schedule


def test_constant_ramps_up_linearly_then_stays():
    f = Constant(warmup_steps=4)
    assert [f(k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert Constant(0)(0) == 1.0


def test_edm2_inverse_sqrt_matches_the_formula():
    # EDM2 eq. 18: alpha_ref / sqrt(max(t / t_ref, 1)), t in batches; ramp-up first
    f = InverseSqrt(ref_batches=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1)
    assert f(4) == pytest.approx(0.5)
    assert f(9) == f(50) == f(100) == 1.0
    assert f(400) == pytest.approx(0.5)
    assert f(900) == pytest.approx(1 / 3)
    assert f(10_000) == pytest.approx(0.1)


def test_edm2_inverse_sqrt_with_the_img64_preset_values():
    # edm2-img64-s: ref_batches 35000, ramp-up 10 Mimg / 2048 = 4883 steps
    f = InverseSqrt(ref_batches=35000, warmup_steps=4883)
    assert f(4882) == 1.0
    assert f(35000) == 1.0
    assert f(140_000) == pytest.approx(0.5)
    assert f(524_287) == pytest.approx(math.sqrt(35000 / 524_287))


def test_cosine_decays_to_the_final_ratio():
    f = Cosine(total_steps=110, warmup_steps=10, final_ratio=0.1)
    assert f(4) == pytest.approx(0.5)  # ramp-up, cosine still at 1
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi/2) = 0
    assert f(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(110) == f(500) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Constant(-1), "lr_schedule.warmup_steps=-1"),
        (lambda: InverseSqrt(0), "lr_schedule.ref_batches=0"),
        (lambda: Cosine(total_steps=-1), "lr_schedule.total_steps=-1"),
        (lambda: Cosine(total_steps=10, final_ratio=2), "lr_schedule.final_ratio=2"),
    ],
)
def test_bad_values_name_their_key(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize("name", ["constant", "edm2_isqrt", "cosine"])
def test_yaml_groups_build_with_the_shared_ramp_up(name):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", [f"lr_schedule={name}", "lr_warmup_steps=7"])
    container = {k: v for k, v in cfg.lr_schedule.items()}
    f = build_lr_schedule(container)
    assert f.warmup_steps == 7 and f(0) == pytest.approx(1 / 7)
    if name == "cosine":
        assert f.total_steps == cfg.trainer.max_steps


def test_checkpoints_without_a_schedule_get_the_constant_ramp_up():
    f = build_lr_schedule(None, warmup_steps=200)
    assert type(f) is Constant and f(99) == 0.5


def _lrs(path) -> list[float]:
    rows = csv.DictReader(path.read_text().splitlines())
    return [float(r["train/lr"]) for r in rows if r.get("train/lr")]


def test_the_optimizer_uses_the_schedule_per_step_and_resumes_exactly(tmp_path):
    # lr 0.1, ramp-up 2 steps, t_ref 3: f = 0.5, 1, 1, 1, sqrt(3/4), sqrt(3/5), ...
    args = [*fast_overrides(tmp_path / "full"), "lr_schedule=edm2_isqrt", "lr_warmup_steps=2"]
    args += ["lr_schedule.ref_batches=3", "optimizer.lr=0.1", "trainer.max_steps=6"]
    args += ["callbacks.model_checkpoint.every_n_train_steps=3"]
    train(compose_train(args, tmp_path / "full"))
    want = [0.1 * InverseSqrt(3, 2)(k) for k in range(6)]
    assert _lrs(tmp_path / "full" / "metrics.csv") == pytest.approx(want)
    ckpt = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(
        0.1 * InverseSqrt(3, 2)(6)
    )
    # resumed from step 3, the run continues the same curve
    resumed = [a for a in args if "full" not in a]
    resumed += [f"paths.log_dir={tmp_path / 'resumed'}"]
    resumed += [f"resume_ckpt={tmp_path / 'full' / 'checkpoints' / 'step_000003.ckpt'}"]
    train(compose_train(resumed, tmp_path / "resumed"))
    assert _lrs(tmp_path / "resumed" / "metrics.csv") == pytest.approx(want[3:])


def test_cosine_without_max_steps_stops_before_training(tmp_path):
    args = [*fast_overrides(tmp_path), "lr_schedule=cosine", "trainer.max_steps=-1"]
    with pytest.raises(ConfigError, match=r"lr_schedule.total_steps=-1 must exceed"):
        build(compose_train(args, tmp_path))
