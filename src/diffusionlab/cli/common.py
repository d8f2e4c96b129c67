"""What the three apps share: every mistake a user can make ends as one ``error: ...`` line on
stderr and exit status 1, never a traceback (Hydra's own composition errors included); a stop
signal ends as one line saying what was finished and how to continue, with exit status 128 +
the signal's number; and the processes of one job share one run directory."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from hydra.errors import HydraException, InstantiationException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffusionlab.cli.vocabulary import prepare_argv
from diffusionlab.distributed import (
    PeerFailed,
    broadcast_object,
    is_main,
    launch_of,
    rank_and_world,
    start_processes,
)
from diffusionlab.errors import ConfigError, TrainingDiverged
from diffusionlab.stopping import Stopped

T = TypeVar("T")
USER_ERRORS = (ConfigError, TrainingDiverged, HydraException, OmegaConfBaseException, PeerFailed)
# the timestamp of the run directory (conf/hydra/default.yaml), the same in every process of a job
RUN_STAMP = "DL_RUN_STAMP"

# the user's own HYDRA_FULL_ERROR, kept for re-launched DDP workers that inherit our override
_USER_FULL_ERROR = "_DIFFUSIONLAB_USER_HYDRA_FULL_ERROR"


def plain(value: Any) -> Any:
    """A config value as plain Python (a ListConfig / DictConfig as list / dict), for checks and
    messages that read user values."""
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


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
    except Stopped as e:
        stopped_exit(e)


def user_errors_exit(task: Callable[..., T]) -> Callable[..., T]:
    """Decorate a Hydra task function (under ``@hydra.main``): a user error inside the job exits
    at once, before Hydra reports it as a failed job with its overrides."""

    @functools.wraps(task)
    def wrapped(*args: Any, **kwargs: Any) -> T:
        try:
            return task(*args, **kwargs)
        except USER_ERRORS as e:
            _exit(e)
        except Stopped as e:
            stopped_exit(e)

    return wrapped


def _exit(e: BaseException) -> NoReturn:
    if os.environ.get(_USER_FULL_ERROR) == "1":
        raise e
    if not is_main():
        sys.exit(1)  # rank 0 says it once for the job (its own error, or the failed process's)
    sys.exit(f"error: {user_message(e)}")


def stopped_exit(e: Stopped) -> NoReturn:
    """The stop line (rank 0 only, once for the job) and exit status 128 + signal number."""
    if is_main():
        print(str(e), file=sys.stderr, flush=True)
    sys.exit(e.exit_code)


def share_run_directory(argv: list[str]) -> list[str]:
    """For an app started as several processes (torchrun, srun): join the process group before
    Hydra runs, take rank 0's timestamp for the run directory, so all processes compose the same
    one, and let only rank 0 write Hydra's ``.hydra/`` record there. Returns the arguments."""
    launch = launch_of()
    if not launch.distributed:
        return argv
    start_processes(launch)
    os.environ[RUN_STAMP] = broadcast_object(datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    if launch.rank == 0 or any(a.startswith("hydra.output_subdir=") for a in argv):
        return argv
    return [*argv, "hydra.output_subdir=null"]


def log_file_per_process() -> None:
    """Processes other than rank 0 log to ``<job>_rank<r>.log`` beside rank 0's ``<job>.log``
    (Hydra opened the same file in every process) and show only warnings on the console, so a
    job's console reads like one process's."""
    rank = rank_and_world()[0]
    if rank == 0:
        return
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler):
            p = Path(h.baseFilename)
            own = logging.FileHandler(p.with_name(f"{p.stem}_rank{rank}{p.suffix}"))
            own.setFormatter(h.formatter)
            own.setLevel(h.level)
            root.removeHandler(h)
            h.close()
            root.addHandler(own)
        elif isinstance(h, logging.StreamHandler):
            h.setLevel(max(h.level, logging.WARNING))


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
