"""A training progress bar that counts optimizer steps out of ``trainer.max_steps``.

Lightning's bar counts batches of an epoch ("Epoch 25/-2" for a run bounded by steps); the
training stream here is endless (data/sampler.py), so steps are the only meaningful count.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """``step k/max_steps`` (``k`` = optimizer steps, also after a resume) with the live metrics."""

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps and max_steps > 0 else float("inf")

    def _get_train_description(self, current_epoch: int) -> str:
        return "step"

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
