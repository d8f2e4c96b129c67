"""Test-only callback: NaN in the whole batch on chosen optimizer steps (``steps=[]``: every one)."""

from __future__ import annotations

import lightning as L


class PoisonBatches(L.Callback):
    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.steps or trainer.global_step in self.steps:
            batch[0].fill_(float("nan"))
