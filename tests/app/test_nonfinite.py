"""Non-finite losses: the step is truly skipped and counted; a run that keeps making them stops
with a message; no checkpoint ever holds non-finite weights."""

from __future__ import annotations

import csv

import pytest
import torch

from diffusionlab.cli.common import user_message
from diffusionlab.cli.train import train
from diffusionlab.errors import TrainingDiverged

from .helpers import compose_train, fast_overrides, run_app

POISON = "+callbacks.poison={_target_:app.poison.PoisonBatches,steps:%s}"


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    overrides = [*fast_overrides(tmp_path), "trainer.max_steps=6", POISON % "[1,3]"]
    train(compose_train(overrides, tmp_path))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6
    # Adam ran 4 real updates: skipped steps leave its step count and moments alone
    steps = {float(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}
    assert steps == {4.0}
    assert all(
        torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()
    )
    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
    counts = [float(r["train/nonfinite_steps"]) for r in rows if r.get("train/nonfinite_steps")]
    assert counts == [0.0, 1.0, 1.0, 2.0, 2.0, 2.0]


def test_a_run_that_keeps_diverging_stops_with_a_message(tmp_path):
    overrides = [*fast_overrides(tmp_path), "trainer.max_steps=20", "max_nonfinite_steps=3"]
    overrides += ["optimizer.lr=0.5", POISON % "[]"]
    with pytest.raises(TrainingDiverged) as e:
        train(compose_train(overrides, tmp_path))
    text = user_message(e.value)
    assert text.startswith("3 consecutive steps with a non-finite loss or gradient (step 2,")
    assert "optimizer.lr=0.5 too high" in text and "trainer.precision=32-true" in text
    assert "(EDMSchedule / EDMParam)" in text
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("lr", ["1e30"])
def test_huge_learning_rate_ends_the_app_with_one_error_line(tmp_path, lr):
    args = [*fast_overrides(tmp_path), f"optimizer.lr={lr}", "trainer.max_steps=40"]
    args += ["max_nonfinite_steps=2", "lr_warmup_steps=0"]
    res = run_app("train.py", args)
    assert res.returncode == 1, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: 2 consecutive steps with a non-finite loss")
        and "Traceback" not in res.stderr
    )
    for ckpt in tmp_path.rglob("*.ckpt"):
        state = torch.load(ckpt, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
