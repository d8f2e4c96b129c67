"""Periodic checkpoints with a retention policy: ``last.ckpt``, the newest ``keep_last`` periodic
checkpoints, and every checkpoint whose step is a multiple of ``keep_every_n_steps``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from diffusionlab.errors import ConfigError


class RetainingModelCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that deletes older periodic checkpoints it wrote.

    ``keep_last=None`` keeps everything; ``keep_every_n_steps=0`` keeps no permanent ones."""

    def __init__(
        self, keep_last: int | None = None, keep_every_n_steps: int = 0, **kwargs: Any
    ) -> None:
        if keep_last is not None and keep_last < 0:
            raise ConfigError(f"callbacks.model_checkpoint.keep_last={keep_last} must be >= 0")
        if keep_every_n_steps < 0:
            raise ConfigError(
                f"callbacks.model_checkpoint.keep_every_n_steps={keep_every_n_steps} must be >= 0"
            )
        super().__init__(**kwargs)
        self.keep_last = keep_last
        self.keep_every_n_steps = keep_every_n_steps
        self.periodic: list[tuple[int, str]] = []  # (step, path) of the periodic files written

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if Path(filepath).stem.startswith(self.CHECKPOINT_NAME_LAST):
            return
        self.periodic = [(s, p) for s, p in self.periodic if p != filepath]
        self.periodic.append((trainer.global_step, filepath))
        self._prune(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """``last.ckpt`` also holds the final step when training stops between two periodic
        saves (``max_steps`` not a multiple of ``every_n_train_steps``, or ``max_time``)."""
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _prune(self, trainer: L.Trainer) -> None:
        if self.keep_last is None:
            return
        cut = len(self.periodic) - self.keep_last
        kept = []
        for i, (step, path) in enumerate(self.periodic):
            permanent = self.keep_every_n_steps and step % self.keep_every_n_steps == 0
            if i >= cut or permanent:
                kept.append((step, path))
            elif trainer.is_global_zero:
                self._remove_checkpoint(trainer, path)
        self.periodic = kept

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "periodic": [list(x) for x in self.periodic]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            self.periodic = [(int(s), str(p)) for s, p in state_dict.get("periodic", [])]
