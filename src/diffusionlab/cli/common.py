"""What the three apps share: every mistake a user can make ends as one ``error: ...`` line on
stderr and exit status 1, never a traceback (Hydra's own composition errors included)."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from hydra.errors import HydraException, InstantiationException, OverrideParseException
from omegaconf.errors import OmegaConfBaseException

from diffusionlab.cli.vocabulary import prepare_argv
from diffusionlab.errors import ConfigError, TrainingDiverged

T = TypeVar("T")
USER_ERRORS = (ConfigError, TrainingDiverged, HydraException, OmegaConfBaseException)

# the user's own HYDRA_FULL_ERROR, kept for re-launched DDP workers that inherit our override
_USER_FULL_ERROR = "_DIFFUSIONLAB_USER_HYDRA_FULL_ERROR"


def run_cli(hydra_main: Callable[[], Any], app: str | None = None) -> None:
    """Call a ``@hydra.main`` function; a user error exits with ``error: <message>``.

    ``app`` (the app's config name) first prepares the command line as every app does
    (:func:`diffusionlab.cli.vocabulary.prepare_args`: old spellings, ``~`` in paths, sampler
    options). Hydra itself prints and swallows errors unless ``HYDRA_FULL_ERROR=1``; we set it so
    they reach us. When the user set ``HYDRA_FULL_ERROR=1`` the full traceback is shown instead."""
    if app is not None:
        prepare_argv(app)
    os.environ.setdefault(_USER_FULL_ERROR, os.environ.get("HYDRA_FULL_ERROR", ""))
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_main()
    except USER_ERRORS as e:
        _exit(e)


def user_errors_exit(task: Callable[..., T]) -> Callable[..., T]:
    """Decorate a Hydra task function (under ``@hydra.main``): a user error inside the job exits
    at once, before Hydra reports it as a failed job with its overrides."""

    @functools.wraps(task)
    def wrapped(*args: Any, **kwargs: Any) -> T:
        try:
            return task(*args, **kwargs)
        except USER_ERRORS as e:
            _exit(e)

    return wrapped


def _exit(e: BaseException) -> NoReturn:
    if os.environ.get(_USER_FULL_ERROR) == "1":
        raise e
    sys.exit(f"error: {user_message(e)}")


def user_message(e: BaseException) -> str:
    """One line for the user: the innermost cause of an instantiation error with its config key,
    Hydra's composition messages folded onto one line, OmegaConf's first line."""
    if isinstance(e, InstantiationException):
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if cause is not e:
            key = getattr(e, "full_key", None) or str(e).partition("full_key:")[2].strip()
            target = str(e).partition("target '")[2].partition("'")[0]
            where = f"config key: {key}" if key else f"in {target}" if target else ""
            return user_message(cause) + (f" ({where})" if where else "")
    if isinstance(e, OmegaConfBaseException):
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "\nOriginal Traceback" in str(e):  # re-raised from a DataLoader worker: its message
        last = str(e).strip().splitlines()[-1]
        return last.partition(": ")[2] or last
    text = _one_line(str(e).split("Config search path")[0])
    if isinstance(e, OverrideParseException):
        text = f"cannot parse override {e.override!r}: {text}"
    if isinstance(e, HydraException) and isinstance(e.__cause__, OmegaConfBaseException):
        text += f" ({user_message(e.__cause__)})"
    return text


def _one_line(text: str) -> str:
    """Fold a multi-line message: ``Header:`` + indented items -> ``Header: a, b, c``."""
    out: list[str] = []
    items: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if line[0].isspace() and out and out[-1].endswith(":"):
            items.append(line.strip())
            continue
        if items:
            out[-1] += " " + ", ".join(items)
            items = []
        out.append(line.strip())
    if items:
        out[-1] += " " + ", ".join(items)
    return " ".join(out)
