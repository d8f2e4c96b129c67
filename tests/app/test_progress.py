"""The training bar counts optimizer steps out of max_steps, also after a resume."""

import re

from diffusionlab.cli.train import train
from diffusionlab.training.progress import StepProgressBar

from .helpers import compose_train, fast_overrides


def _bar_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if "━" in line]


def test_progress_bar_shows_steps_out_of_max_steps(tmp_path, capsys):
    base = [o for o in fast_overrides(tmp_path) if "rich_progress_bar" not in o]
    base += ["~callbacks.sample_grid", "callbacks.model_checkpoint.every_n_train_steps=1"]
    train(compose_train([*base, "trainer.max_steps=2"], tmp_path / "a"))
    (line,) = _bar_lines(capsys)
    assert line.startswith("step") and "Epoch" not in line
    assert re.search(r" 2/2 ", line), line
    resume = f"resume_ckpt={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}"
    train(compose_train([*base, "trainer.max_steps=3", resume], tmp_path / "b"))
    assert re.search(r" 3/3 ", _bar_lines(capsys)[-1])


def test_bar_shows_the_loss_and_updates_at_most_refresh_rate_times_a_second(
    tmp_path, capsys, monkeypatch
):
    """``train/loss`` comes from training_step's output (the module logs it only on logging
    steps); with ``refresh_rate=1`` five fast steps update the bar at the first and last only."""
    updated: list[int] = []
    update = StepProgressBar._update

    def record(self, bar_id, current, *args, **kwargs):
        updated.append(current)
        return update(self, bar_id, current, *args, **kwargs)

    monkeypatch.setattr(StepProgressBar, "_update", record)
    base = [o for o in fast_overrides(tmp_path) if "rich_progress_bar" not in o]
    base += ["~callbacks.sample_grid", "callbacks.rich_progress_bar.refresh_rate=1"]
    train(compose_train([*base, "trainer.max_steps=5", "trainer.log_every_n_steps=50"], tmp_path))
    assert updated == [1, 5]
    line = _bar_lines(capsys)[-1]
    assert re.search(r"train/loss: \d+\.\d+", line), line
