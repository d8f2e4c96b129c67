"""The vocabulary's renamed keys (docs/vocabulary.md): every old spelling still works for one
release, rewritten to its new key with a warning that names the new key, on the command line and
in a preset or a user's YAML; the table in the docs lists every rename."""

import sys

import pytest
from omegaconf import OmegaConf

from diffusionlab.cli.vocabulary import (
    RENAMES,
    deprecation,
    migrate_config,
    prepare_args,
    prepare_argv,
)

from .helpers import ROOT

DOC = (ROOT / "docs" / "vocabulary.md").read_text()


def _example(key: str) -> str:
    return key.replace("*.", "callbacks.fid.") if key.startswith("*.") else key


@pytest.mark.parametrize("rename", RENAMES, ids=[r.old for r in RENAMES])
def test_old_key_is_rewritten_with_a_warning_naming_the_new_one(rename):
    app = rename.apps[0] if rename.apps else "sample"
    old, new = _example(rename.old), _example(rename.new)
    args, warnings = prepare_args(app, [f"{old}=7", "+other=1"])
    assert args == [f"{new}=7", "+other=1"]
    assert warnings == [deprecation(old, new)]
    assert f"use {new}= instead" in warnings[0]
    # in a config (a preset or the user's own YAML): moved, unless the shipped config aliases it
    cfg = OmegaConf.create({})
    OmegaConf.update(cfg, old, 7, force_add=True)
    assert migrate_config(cfg, app) == [deprecation(old, new)]
    assert OmegaConf.select(cfg, new) == 7 and OmegaConf.select(cfg, old) is None


def test_renames_apply_only_to_their_apps():
    assert prepare_args("evaluate", ["n=4"]) == (["n=4"], [])
    assert prepare_args("sample", ["n=4"])[0] == ["num_samples=4"]
    assert prepare_args("compare", ["sweep=a"])[0] == ["sweep_dir=a"]
    assert prepare_args("evaluate", ["sweep.grids=[karras]"])[0] == [
        "nfe_sweep.discretizations=[karras]"
    ]


def test_the_command_line_prints_the_warning(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["sample.py", "n=4", "ckpt=x"])
    prepare_argv("sample")
    assert sys.argv == ["sample.py", "num_samples=4", "ckpt=x"]
    assert "warning: n= is deprecated" in capsys.readouterr().err


def test_docs_table_lists_every_rename():
    for r in RENAMES:
        old, new = r.old.removeprefix("*."), r.new.removeprefix("*.")
        leaf_old, leaf_new = old.rsplit(".", 1)[-1], new.rsplit(".", 1)[-1]
        assert f"`{old}" in DOC or f"/ `{leaf_old}`" in DOC, r.old
        assert f"`{new}" in DOC or f"/ `{leaf_new}`" in DOC or "/ ..." in DOC, r.new
