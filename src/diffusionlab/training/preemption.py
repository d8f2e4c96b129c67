"""Preemption: SIGTERM or SIGUSR1 saves ``last.ckpt`` at the next step boundary and ends the run
with exit status 0, so a requeued job continues from it (``resume_ckpt=<run>/checkpoints/last.ckpt``);
SIGINT (Ctrl-C) saves the same way and ends with status 130.

Under SLURM with Lightning's auto-requeue (``SLURMEnvironment``, the default when SLURM runs the
job), Lightning owns the requeue signal: it writes ``<run>/hpc_ckpt_<n>.ckpt``, calls ``scontrol
requeue``, and a requeued job with the same run directory resumes from that file by itself.

From the start of training the stop signals are recorded (``diffusionlab.stopping``, chained to
Lightning's own handlers), so the work after the last step (the final sample grid, the final FID)
stops within one network evaluation; this callback then makes sure ``last.ckpt`` holds the final
step before the run ends."""

from __future__ import annotations

import logging
import signal
from contextlib import ExitStack
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffusionlab.stopping import Stopped, received, stop_signals

log = logging.getLogger(__name__)


class Preemption(L.Callback):
    """Save ``<dirpath>/last.ckpt`` (through the trainer's atomic checkpoint IO) and stop when
    Lightning has seen SIGTERM, or a SIGINT or SIGUSR1 (outside SLURM) arrived; ``signal`` then
    names what stopped the run."""

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self.signal: str | None = None
        self._signals = ExitStack()
        self._slurm_usr1 = False
        self._saved_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its SIGTERM (and SLURM's SIGUSR1) handlers before this hook; ours
        # record the signal and call them
        self._slurm_usr1 = signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None)
        self._signals.enter_context(stop_signals(chain=True))

    def _stop_signal(self, trainer: L.Trainer) -> str | None:
        """The signal that stops training now: SIGTERM (Lightning's flag), SIGINT, or SIGUSR1
        unless Lightning's SLURM requeue owns it (then training goes on until SLURM ends it)."""
        if trainer.received_sigterm:
            return "SIGTERM"
        for name in received():
            if name == "SIGINT" or (name == "SIGUSR1" and not self._slurm_usr1):
                return name
        return None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sig = self._stop_signal(trainer)
        if sig is not None:
            self.signal = sig
            self._save(trainer)
            trainer.should_stop = True

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # a SIGTERM that lands after the hook above (or on another rank under DDP) makes
        # Lightning stop between two steps with SIGTERMException; a stop signal during the work
        # after the last step ends it with Stopped before the final checkpoint: save there, once
        if isinstance(exception, SIGTERMException | Stopped) and self._saved_step != (
            trainer.global_step
        ):
            self.signal = exception.signal if isinstance(exception, Stopped) else "SIGTERM"
            self._save(trainer)
        self._signals.close()

    def _save(self, trainer: L.Trainer) -> None:
        path = self.dirpath / "last.ckpt"
        if self._saved_step == trainer.global_step:
            return
        if not _checkpointed(trainer, path):  # else the checkpoint callback wrote it at this step
            trainer.save_checkpoint(path)
        log.warning("%s: saved %s at step %d; stopping", self.signal, path, trainer.global_step)
        self._saved_step = trainer.global_step

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._signals.close()


def _checkpointed(trainer: L.Trainer, path: Path) -> bool:
    """The checkpoint callback already wrote ``path`` at this step."""
    cb = trainer.checkpoint_callback
    return (
        cb is not None
        and getattr(cb, "_last_global_step_saved", None) == trainer.global_step
        and Path(getattr(cb, "last_model_path", "") or "") == path
    )
