"""The training bar counts optimizer steps out of max_steps, also after a resume."""

import re

from diffusionlab.cli.train import train

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
    resume = f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}"
    train(compose_train([*base, "trainer.max_steps=3", resume], tmp_path / "b"))
    assert re.search(r" 3/3 ", _bar_lines(capsys)[-1])
