"""dl-train-extractor: key=value arguments, the weights where the evaluator looks, one-line errors."""

from __future__ import annotations

import pytest
import torch

from diffusionlab.cli.train_extractor import main, train_extractor
from diffusionlab.evaluation.extractors import domain_weights_path


def test_dl_train_extractor_stores_the_weights_where_the_evaluator_looks(tmp_path, capsys):
    train_extractor(["dataset=digits", "resolution=8", f"cache_dir={tmp_path}", "steps=2"])
    path = domain_weights_path(tmp_path, "digits", 8)
    assert f"saved {path}" in capsys.readouterr().out
    state = torch.load(path, weights_only=True)
    assert state["resolution"] == 8 and 0.0 <= state["accuracy"] <= 1.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["datasets=digits"], "cannot read 'datasets=digits'"),
        (["steps=many"], "resolution and steps must be integers"),
        (["dataset=cifar10"], "dataset 'cifar10' is not embedded"),
    ],
)
def test_dl_train_extractor_errors_are_one_line(tmp_path, monkeypatch, args, message):
    # as a user runs it (the tests' default is 1); run_cli's own variables are restored after
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setenv("_DIFFUSIONLAB_USER_HYDRA_FULL_ERROR", "0")
    with pytest.raises(SystemExit) as e:
        main([*args, f"cache_dir={tmp_path}"])
    assert str(e.value).startswith("error: ") and message in str(e.value)
