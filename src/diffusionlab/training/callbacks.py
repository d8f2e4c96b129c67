"""Callbacks: a fixed-seed sample grid from the EMA weights, written as PNG and sent to loggers."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from diffusionlab.evaluation.learned_grids import resolve_sampler
from diffusionlab.training.images import log_image, save_samples_png

log = logging.getLogger(__name__)


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` steps and at the end of training, sample ``n`` images (or points)
    from seeds ``seed .. seed + n - 1`` with the EMA denoiser and save ``samples/step_XXXXXX.png``.

    Class-conditional models get label ``i % label_dim`` for sample ``i`` (one class per column
    when ``n`` is a multiple of ``label_dim``).
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        n: int = 64,
        seed: int = 0,
        sampler: dict | None = None,
        dirname: str = "samples",
    ) -> None:
        self.every_n_steps = every_n_steps
        self.n = n
        self.seed = seed
        self.sampler = (
            resolve_sampler(sampler, key="callbacks.sample_grid.sampler") if sampler else None
        )
        self.dirname = dirname
        self.last_path: Path | None = None

    def _labels(self, pl_module: L.LightningModule) -> Tensor | None:
        if pl_module.label_dim == 0:
            return None
        idx = torch.arange(self.n, device=pl_module.device) % pl_module.label_dim
        return pl_module.one_hot(idx)

    def _sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        was_training = pl_module.training
        pl_module.eval()
        seeds = range(self.seed, self.seed + self.n)
        x = pl_module.generate(seeds, class_labels=self._labels(pl_module), sampler=self.sampler)
        pl_module.train(was_training)
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        path = Path(trainer.default_root_dir) / self.dirname / f"step_{step:06d}.png"
        save_samples_png(x.cpu(), path)
        self.last_path = path
        log.info("sample grid: %s", path)
        for logger in trainer.loggers:
            log_image(logger, "samples/grid", path, step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation: the step is not complete
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self._sample(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sample(trainer, pl_module)
