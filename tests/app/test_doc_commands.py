"""Every command of README.md and docs/*.md composes as written: each app's command line is
prepared as the app prepares it (cli/vocabulary.py), composed by Hydra (each job of a ``-m``
sweep), uses no deprecated key, and names samplers and options that exist. Commands that run
small live in the per-document tests (test_data_doc.py, test_latent_doc.py, ...); this one
catches any command a document gains or a config loses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from diffusionlab.cli.train import inherit_samplers
from diffusionlab.cli.train_extractor import DEFAULTS as EXTRACTOR_KEYS
from diffusionlab.cli.vocabulary import APPS, migrate_config, prepare_args
from diffusionlab.config import CONF_DIR
from diffusionlab.sampling.spec import SamplerSpec

from .helpers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# shell variables and placeholders of the documents -> paths (composition reads no file)
SHELL = {
    "$(dirname $CKPT)": "runs/x/checkpoints",
    "$CKPT": "runs/x/checkpoints/last.ckpt",
    "$PKL": "edm-cifar10-32x32-uncond-vp.pkl",
    "$NET": "edm2-img512-s.pkl",
    "$GNET": "edm2-img512-xs.pkl",
    "$AE": "runs/ae/autoencoder.pt",
}
_NAMES = "|".join(re.escape(a) for a in sorted(APPS, key=len, reverse=True))
_APP = re.compile(rf"^(?:(?:srun|torchrun)\b.*?\s)?(?:python\s+)?(?P<app>{_NAMES})(?:\s|$)")


def _lines(text: str) -> list[str]:
    """The commands of a markdown text: lines of fenced and indented code blocks (continuations
    joined) and inline code spans written as a command (``python train.py ...``, ``dl-edit
    ...``) that elide none of their arguments (no ``...``)."""
    found = []
    for block in re.findall(r"```[\w-]*\n(.*?)```", text, re.S):
        found += [line.strip() for line in block.replace("\\\n", " ").splitlines()]
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    # indented code blocks (four spaces), continuations joined
    for line in re.sub(r"\\\n\s+", " ", text).splitlines():
        if line.startswith("    ") and _APP.match(line.strip()):
            found.append(line.strip())
    for span in re.findall(r"`([^`]+)`", text):
        span = " ".join(span.split())
        if span.startswith(("python ", "dl-")) and "=" in span and "..." not in span:
            found.append(span)
    return found


def documented_commands() -> list[tuple[str, str]]:
    """(document, command) for every app command in README.md and docs/*.md, each once."""
    out, seen = [], set()
    for doc in DOCS:
        for line in _lines(doc.read_text()):
            if _APP.match(line) and line not in seen:
                seen.add(line)
                out.append((doc.name, line))
    return out


def _words(command: str) -> tuple[str, list[str]]:
    for var, value in SHELL.items():
        command = command.replace(var, value)
    command = re.sub(r"<([\w ]+)>", lambda m: m.group(1).replace(" ", "_"), command)
    words = shlex.split(command, comments=True)
    if words and words[-1] == "&":  # run in the background (the two nodes of a doc example)
        words = words[:-1]
    i = next(i for i, w in enumerate(words) if w in APPS)
    return words[i], words[i + 1 :]


def _jobs(args: list[str]) -> list[list[str]]:
    """The override lists of the jobs a command runs (a ``-m`` sweep: each job's)."""
    if "-m" not in args and "--multirun" not in args:
        return [args]
    args = [a for a in args if a not in ("-m", "--multirun")]
    parsed = OverridesParser.create().parse_overrides(args)
    (batch,) = BasicSweeper.split_arguments(parsed, None)
    return batch


def _check_samplers(cfg: DictConfig, where: str) -> None:
    """Every sampler node that names a sampler builds it with its options."""
    nodes = [("sampler", cfg.get("sampler"))]
    nodes += [
        (f"callbacks.{k}.sampler", v.get("sampler"))
        for k, v in (cfg.get("callbacks") or {}).items()
        if isinstance(v, DictConfig)
    ]
    for key, node in nodes:
        if node is None or node.get("name") is None or node.get("discretization") == "learned":
            continue
        SamplerSpec.from_config(node, key=key).sampler()


COMMANDS = documented_commands()


def test_the_documents_hold_the_commands():
    assert len(COMMANDS) >= 90
    apps = {_words(c)[0] for _, c in COMMANDS}
    assert {"train.py", "sample.py", "evaluate.py", "dl-dataset", "dl-fit-sigmas"} <= apps


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_documented_command_composes(doc, command):
    script, args = _words(command)
    app = APPS[script]
    if app == "train_extractor":  # key=value of its own
        assert all(a.split("=")[0] in EXTRACTOR_KEYS for a in args), command
        return
    if app == "dataset_tool":
        assert args[0] in ("convert", "encode"), command
        args = [*args[1:], f"command={args[0]}"]
    args, warnings = prepare_args(app, args)
    assert not warnings, f"{doc}: {command}: {warnings}"
    jobs = _jobs(args)
    for overrides in jobs:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name=app, overrides=overrides, return_hydra_config=True)
        assert not migrate_config(cfg, app), command
        if app == "train":
            inherit_samplers(cfg)
            # logs/train/..., W&B job type train (debug=: logs/debug/, W&B off)
            assert cfg.task_name == ("debug" if "debug=" in command else "train"), command
        _check_samplers(cfg, command)


def test_every_experiment_runs_as_a_train_job():
    """``experiment=`` presets keep the run folder (logs/train/runs/...) and W&B job type
    (train) that README and docs/logging.md promise; the preset's name is the run config's
    ``experiment`` key."""
    for path in sorted((Path(CONF_DIR) / "experiment").glob("*.yaml")):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"experiment={path.stem}"])
        assert cfg.task_name == "train", path.name
