"""Stop signals in every phase: SIGTERM, SIGINT and SLURM's SIGUSR1 are recorded while
:func:`stop_signals` is active, and the work ends at its next stop point (:func:`check`: every
network evaluation of the generator, every batch of the apps' loops) with :class:`Stopped`.

Nothing is torn: files are written atomically (``files.atomic_write``), so a stop leaves whole
files and no half-written one. A second SIGINT (Ctrl-C twice) interrupts at once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# SLURM's requeue signal (``#SBATCH --signal=USR1@120``), as Lightning's SLURM environment reads it
REQUEUE_SIGNAL = signal.SIGUSR1

F = TypeVar("F", bound=Callable[..., Any])


class Stopped(Exception):
    """Raised at a stop point after a stop signal. ``signal`` is its name (``SIGTERM``);
    ``exit_code`` is the shell's 128 + signal number; the message says what was finished and how
    to continue when the app knows it."""

    def __init__(self, signame: str, message: str = "") -> None:
        self.signal = signame
        super().__init__(message or f"{signame}: stopped")

    @property
    def exit_code(self) -> int:
        return 128 + int(getattr(signal, self.signal, 15))

    def because(self, message: str) -> Stopped:
        """The same stop with the app's own line: ``<SIGNAL>: <message>``."""
        return Stopped(self.signal, f"{self.signal}: {message}")


_received: list[int] = []  # signal numbers received inside the active session, in order
_active = threading.local()


def requested() -> str | None:
    """The name of the first stop signal received in the active session, or None."""
    return signal.Signals(_received[0]).name if _received else None


def received() -> list[str]:
    """The names of the stop signals received in the active session, in order."""
    return [signal.Signals(s).name for s in _received]


def check() -> None:
    """A stop point: raise :class:`Stopped` when a stop signal has arrived."""
    if _received:
        raise Stopped(signal.Signals(_received[0]).name)


def record(signum: int) -> None:
    """Record a stop signal seen by someone else's handler (Lightning's SIGTERM flag)."""
    if signum not in _received:
        _received.append(signum)


def stoppable(fn: F) -> F:
    """``fn`` with a stop point before every call (a denoiser: one per network evaluation)."""

    def checked(*args: Any, **kwargs: Any) -> Any:
        check()
        return fn(*args, **kwargs)

    return checked  # type: ignore[return-value]


@contextmanager
def stop_signals(chain: bool = True) -> Iterator[None]:
    """Record SIGTERM, SIGINT and SIGUSR1 instead of dying, for the duration of the block, so
    that :func:`check` stops the work at its next stop point. With ``chain`` the handlers that
    were installed before (Lightning's SIGTERM flag, its SLURM requeue, submitit's) still run;
    Python's own SIGINT handler (KeyboardInterrupt) does not, until a second SIGINT. Nested blocks
    share the outer one; outside the main thread this does nothing (signals go to the main one)."""
    if getattr(_active, "depth", 0) or threading.current_thread() is not threading.main_thread():
        _active.depth = getattr(_active, "depth", 0) + 1
        try:
            yield
        finally:
            _active.depth -= 1
        return
    _received.clear()
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def handler(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and signal.SIGINT in _received:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt  # Ctrl-C twice: now
        record(signum)
        before = previous[signum]
        if chain and callable(before) and before is not signal.default_int_handler:
            before(signum, frame)

    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    _active.depth = 1
    try:
        yield
    finally:
        _active.depth = 0
        for s, before in previous.items():
            if signal.getsignal(s) is handler:  # not replaced meanwhile (Lightning's teardown)
                signal.signal(s, before if before is not None else signal.SIG_DFL)
        _received.clear()


def slurm_job_id(environ: dict[str, str] | None = None) -> str | None:
    """The id ``scontrol requeue`` takes for this SLURM batch job (``<array job>_<task>`` in an
    array), None outside SLURM or in an interactive allocation (Lightning's rule)."""
    env = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def requeue_slurm_job(signame: str) -> str | None:
    """After SLURM's requeue signal (SIGUSR1) in a SLURM batch job: ``scontrol requeue`` it, so
    the same command runs again and continues from what was written. Returns what happened, for
    the stop line; None when not applicable."""
    job = slurm_job_id()
    if signame != REQUEUE_SIGNAL.name or job is None or not re.fullmatch(r"[0-9_]+", job):
        return None
    try:
        res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except FileNotFoundError:
        return f"could not requeue SLURM job {job} (no scontrol on PATH)"
    if res.returncode:
        return f"requeueing SLURM job {job} failed: {(res.stderr or res.stdout).strip()}"
    return f"requeued SLURM job {job}"
