"""The vocabulary every app shares (docs/vocabulary.md) and the preparation of the command line
that every app applies before Hydra reads it:

- old spellings of renamed keys are rewritten to the new key, with a warning that names it (they
  keep working for one release);
- ``~`` at the start of a value is expanded as a shell would (``dataset.path=~/faces``: bash
  leaves it alone after ``key=`` and Hydra's grammar rejects it);
- a sampler option needs no ``+`` (``sampler.options.eta=0.5``, also on the nodes that inherit
  the run's sampler, ``callbacks.fid.sampler.options.S_churn=0``): the sampler checks its options
  itself and names the valid ones;
- values Hydra would read as a sweep are quoted (``seeds=0-9,20`` outside ``-m``).

Tests and the documentation check compose commands through :func:`prepare_args` too, so they see
exactly what the apps see.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf, open_dict

# command -> the app's config (conf/<name>.yaml); every console script in pyproject.toml is here
APPS: dict[str, str] = {
    "train.py": "train",
    "dl-train": "train",
    "sample.py": "sample",
    "dl-sample": "sample",
    "evaluate.py": "evaluate",
    "dl-evaluate": "evaluate",
    "dl-compare": "compare",
    "dl-dataset": "dataset_tool",
    "dl-edit": "edit",
    "dl-export": "export",
    "dl-fit-sigmas": "fit_grid",
    "dl-inpaint": "inpaint",
    "dl-interpolate": "interpolate",
    "dl-reconstruct-ema": "reconstruct_ema",
    "dl-train-autoencoder": "train_autoencoder",
    "dl-train-extractor": "train_extractor",
    "dl-upsample": "upsample",
    "dl-prompt-accuracy": "prompt_accuracy",
}

# console scripts kept under their old name for one release: old -> new
OLD_COMMANDS: dict[str, str] = {"dl-fit-grid": "dl-fit-sigmas"}


@dataclass(frozen=True)
class Rename:
    """``old`` -> ``new`` in the apps ``apps`` (config names; empty: every app). A key under
    ``old`` moves with it (``sweep.nfe`` -> ``nfe_sweep.nfe``); ``*.`` in front matches the key at
    any depth (``*.sampler.grid``: ``sampler.grid``, ``callbacks.fid.sampler.grid``)."""

    old: str
    new: str
    apps: tuple[str, ...] = ()

    def applies(self, app: str) -> bool:
        return not self.apps or app in self.apps

    def rename(self, key: str) -> str | None:
        """The new spelling of ``key``, or None when this rename does not touch it."""
        if self.old.startswith("*."):
            old, new = self.old[2:], self.new[2:]
            m = re.match(rf"^(.*\.)?{re.escape(old)}(\..*)?$", key)
            return None if m is None else f"{m.group(1) or ''}{new}{m.group(2) or ''}"
        if key == self.old or key.startswith(self.old + "."):
            return self.new + key[len(self.old) :]
        return None


# The renames of issue 21 (one vocabulary); the old spellings stop working in the next release.
# Longer keys first where one is under another (sweep.grids before sweep).
RENAMES: tuple[Rename, ...] = (
    # every app: the file of a learned sigma grid ("grid" is an image grid)
    Rename("*.sampler.grid", "*.sampler.sigmas_file"),
    # train.py: the checkpoint a run resumes from (every checkpoint key ends in ckpt)
    Rename("ckpt_path", "resume_ckpt", ("train",)),
    # W&B settings under wandb.* as in every app
    *(
        Rename(f"logger.wandb.{key}", f"wandb.{key}", ("train",))
        for key in ("project", "entity", "group", "name", "mode", "name_exclude")
    ),
    # warm-up is spelled "warmup" everywhere (lr_warmup_steps, ema.warmup, ...)
    Rename("lr_schedule.rampup_steps", "lr_schedule.warmup_steps", ("train",)),
    Rename("ema.rampup_ratio", "ema.warmup_ratio", ("train",)),
    # the training grid's image count, as every sample count
    Rename("callbacks.sample_grid.n", "callbacks.sample_grid.num_samples", ("train",)),
    # sample.py: how many images
    Rename("n", "num_samples", ("sample",)),
    # evaluate.py: the NFE sweep beside ema_sweep; its sigma-grid rules are discretizations
    Rename("sweep.grids", "nfe_sweep.discretizations", ("evaluate",)),
    Rename("sweep", "nfe_sweep", ("evaluate",)),
    # dl-compare: the sweep folder it reads, the folder it writes
    Rename("sweep", "sweep_dir", ("compare",)),
    Rename("out", "outdir", ("compare", "reconstruct_ema")),
    # dl-fit-sigmas writes one file: dest, as dl-export and dl-dataset write theirs
    Rename("out", "dest", ("fit_grid",)),
    # dl-inpaint: fills per input
    Rename("samples", "num_samples", ("inpaint",)),
)

# Hydra flags followed by a value that is not an override
_FLAGS_WITH_VALUE = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
}
_OVERRIDE = re.compile(r"^(?P<prefix>~|\+\+|\+)?(?P<key>[A-Za-z_][\w.@/-]*)(?P<rest>=.*)?$", re.S)
# keys whose comma lists are not sweeps (outside -m): quoted
_QUOTED: dict[str, tuple[str, ...]] = {"sample": ("seeds",), "upsample": ("seeds",)}


def deprecation(old: str, new: str) -> str:
    return f"{old}= is deprecated and stops working in the next release: use {new}= instead"


def prepare_args(app: str, args: Sequence[str]) -> tuple[list[str], list[str]]:
    """The overrides ``args`` of the app ``app`` (its config name) as Hydra should read them, and
    the deprecation warnings of the old spellings among them."""
    out: list[str] = []
    warnings: list[str] = []
    multirun = "-m" in args or "--multirun" in args
    skip = False
    for arg in args:
        if skip or arg.startswith("-"):
            skip = arg in _FLAGS_WITH_VALUE
            out.append(arg)
            continue
        m = _OVERRIDE.match(arg)
        if m is None:
            out.append(arg)
            continue
        prefix, key, rest = m.group("prefix") or "", m.group("key"), m.group("rest") or ""
        for r in RENAMES:
            new = r.rename(key) if r.applies(app) else None
            if new is not None:
                warnings.append(deprecation(key, new))
                key = new
                break
        if rest.startswith("=~") and (rest == "=~" or rest[2] in "/" + os.sep):
            rest = "=" + os.path.expanduser(rest[1:])
        if not prefix and rest and re.search(r"(^|\.)sampler\.options\.[^.]+$", key):
            prefix = "++"  # a sampler checks its own options (and lists the valid ones)
        value = rest[1:]
        if (
            key in _QUOTED.get(app, ())
            and not prefix
            and not multirun
            and "," in value
            and value[:1] not in "['\""
        ):
            rest = f"='{value}'"
        out.append(prefix + key + rest)
    return out, warnings


def prepare_argv(app: str) -> None:
    """Rewrite ``sys.argv`` for the app ``app`` and print the deprecation warnings to stderr."""
    args, warnings = prepare_args(app, sys.argv[1:])
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    sys.argv = [sys.argv[0], *args]


def migrate_config(cfg: DictConfig, app: str) -> list[str]:
    """Move keys of ``cfg`` spelled the old way (a preset or a user's own YAML: the command line is
    prepared by :func:`prepare_args`) to their new key; returns the warnings. A key whose value is
    an interpolation is the shipped config's own alias and stays."""
    warnings: list[str] = []
    for r in RENAMES:
        if not r.applies(app):
            continue
        for old in _present(cfg, r.old):
            new = r.rename(old)
            parent, _, leaf = old.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if new is None or OmegaConf.is_interpolation(node, leaf):
                continue
            value = node[leaf]
            with open_dict(cfg):
                node.pop(leaf)
                if parent and len(node) == 0:  # nothing else was under it: gone with the key
                    grand, _, name = parent.rpartition(".")
                    (OmegaConf.select(cfg, grand) if grand else cfg).pop(name)
                OmegaConf.update(cfg, new, value, merge=True, force_add=True)
            warnings.append(deprecation(old, new))
    return warnings


def _present(cfg: DictConfig, old: str) -> list[str]:
    """The keys of ``cfg`` that spell ``old`` (``*.`` in front: at any depth)."""
    if not old.startswith("*."):
        parent, _, leaf = old.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        return [old] if isinstance(node, DictConfig) and leaf in node else []
    found: list[str] = []
    tail = old[2:]

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node:
            path = f"{prefix}{key}"
            if path == tail or path.endswith("." + tail):
                found.append(path)
            else:
                child = node._get_node(key)
                if isinstance(child, DictConfig) and not child._is_interpolation():
                    walk(child, path + ".")

    walk(cfg, "")
    return found


def warn_deprecated(old: str, new: str, instead: str | None = None) -> None:
    """A deprecated key an app still reads itself (not a plain rename): the warning on stderr."""
    text = deprecation(old, new)
    print(
        f"warning: {text if instead is None else text.replace(f'{new}=', instead)}", file=sys.stderr
    )


def warn_old_command(old: str) -> None:
    """A console script called by its old name: say the new one."""
    print(
        f"warning: {old} is deprecated and stops working in the next release: use "
        f"{OLD_COMMANDS[old]} instead",
        file=sys.stderr,
    )
