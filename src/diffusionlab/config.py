"""Hydra/OmegaConf glue shared by the apps: where ``conf/`` lives and the custom resolvers.

``conf/`` is shipped inside the package (``diffusionlab/conf`` in a built wheel, mapped from the
checkout's ``conf/`` by setup.py); a source checkout reads its own ``conf/``. The project root
(``paths.root_dir``: ``logs/``, ``data/``, ``.cache/``) is the checkout, or for an installed
package the working directory (``DIFFUSIONLAB_ROOT`` overrides both)."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE.parents[1]


def _is_checkout(path: Path) -> bool:
    return (path / "conf" / "train.yaml").is_file() and (path / "pyproject.toml").is_file()


def project_root() -> Path:
    """``DIFFUSIONLAB_ROOT``, else the source checkout this package runs from, else (an installed
    wheel) the working directory: where ``logs/``, ``data/`` and ``.cache/`` go."""
    env = os.environ.get("DIFFUSIONLAB_ROOT")
    if env:
        return Path(env).resolve()
    return _CHECKOUT if _is_checkout(_CHECKOUT) else Path.cwd()


def conf_dir() -> Path:
    """The apps' configs: the checkout's ``conf/`` when running from source, else the copy
    shipped in the package (``diffusionlab/conf``)."""
    if _is_checkout(_CHECKOUT):
        return _CHECKOUT / "conf"
    shipped = _PACKAGE / "conf"
    if (shipped / "train.yaml").is_file():
        return shipped
    raise RuntimeError(f"no conf/ in {_CHECKOUT} nor in the package ({shipped}): reinstall")


CONF_DIR = str(conf_dir())


def register_resolvers() -> None:
    """``${dl.root:}`` -> project root; ``${dl.if:cond,a,b}``."""
    if not OmegaConf.has_resolver("dl.root"):
        OmegaConf.register_new_resolver("dl.root", lambda: str(project_root()))
    if not OmegaConf.has_resolver("dl.if"):
        OmegaConf.register_new_resolver("dl.if", lambda c, a, b: a if c else b)


register_resolvers()
