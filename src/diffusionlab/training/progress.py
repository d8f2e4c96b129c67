"""A training progress bar that counts optimizer steps out of ``trainer.max_steps``.

Lightning's bar counts batches of an epoch ("Epoch 25/-2" for a run bounded by steps); the
training stream here is endless (data/sampler.py), so steps are the only meaningful count.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """``step k/max_steps`` (``k`` = optimizer steps, also after a resume) with the live metrics
    and the training loss (``train/loss``, taken from ``training_step``'s output on logging
    steps: reading it on other steps would make the host wait for the device).

    The bar's task and metrics are updated at most ``refresh_rate`` times a second (the rate rich
    redraws at) and at the last step: updating them costs about half a millisecond, a few
    percent of a small model's step when done every step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._updated_at = -float("inf")
        self._loss: float | None = None

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps and max_steps > 0 else float("inf")

    def _get_train_description(self, current_epoch: int) -> str:
        return "step"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        return metrics if self._loss is None else {**metrics, "train/loss": self._loss}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        last = trainer.global_step >= self.total_train_batches
        if last or trainer._logger_connector.should_update_logs:  # a logging step
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            self._loss = None if loss is None else float(loss)
        now = time.monotonic()
        if now - self._updated_at < 1 / self.refresh_rate and not last:
            return
        self._updated_at = now
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
