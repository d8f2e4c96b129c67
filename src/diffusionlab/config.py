"""Hydra/OmegaConf glue shared by the apps: where ``conf/`` lives and the custom resolvers."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf


def project_root() -> Path:
    """The checkout that holds ``conf/`` (``DIFFUSIONLAB_ROOT`` overrides)."""
    env = os.environ.get("DIFFUSIONLAB_ROOT")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parents[2]


CONF_DIR = str(project_root() / "conf")


def register_resolvers() -> None:
    """``${dl.root:}`` -> project root; ``${dl.if:cond,a,b}``."""
    if not OmegaConf.has_resolver("dl.root"):
        OmegaConf.register_new_resolver("dl.root", lambda: str(project_root()))
    if not OmegaConf.has_resolver("dl.if"):
        OmegaConf.register_new_resolver("dl.if", lambda c, a, b: a if c else b)


register_resolvers()
