"""Preemption: SIGTERM or SIGUSR1 saves ``last.ckpt`` at the next step boundary and ends the run
with exit status 0, so a requeued job continues from it (``resume_ckpt=<run>/checkpoints/last.ckpt``).

Under SLURM with Lightning's auto-requeue (``SLURMEnvironment``, the default when SLURM runs the
job), Lightning owns the requeue signal: it writes ``<run>/hpc_ckpt_<n>.ckpt``, calls ``scontrol
requeue``, and a requeued job with the same run directory resumes from that file by itself."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class Preemption(L.Callback):
    """Save ``<dirpath>/last.ckpt`` (through the trainer's atomic checkpoint IO) and stop when
    Lightning has seen SIGTERM or this callback has seen SIGUSR1."""

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self.signal: str | None = None
        self._previous = None
        self._saved_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its SIGTERM (and SLURM's SIGUSR1) handlers before this hook
        if threading.current_thread() is threading.main_thread() and signal.getsignal(
            signal.SIGUSR1
        ) in (signal.SIG_DFL, None):
            self._previous = signal.signal(signal.SIGUSR1, self._on_sigusr1)

    def _on_sigusr1(self, signum: int, frame) -> None:
        self.signal = "SIGUSR1"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.received_sigterm:
            self.signal = "SIGTERM"
        if self.signal is not None:
            self._save(trainer)
            trainer.should_stop = True

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # a SIGTERM that lands after the hook above (or on another rank under DDP) makes
        # Lightning stop between two steps with SIGTERMException: save there, once
        if isinstance(exception, SIGTERMException) and self._saved_step != trainer.global_step:
            self.signal = "SIGTERM"
            self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        log.warning("%s: saved %s at step %d; stopping", self.signal, path, trainer.global_step)
        self.signal = None
        self._saved_step = trainer.global_step

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None
