"""Throughput and memory of the training loop, logged under ``perf/``."""

from __future__ import annotations

import time

import lightning as L
import torch


class PerfMonitor(L.Callback):
    """Every ``every_n_steps`` optimizer steps (default: ``trainer.log_every_n_steps``) log, at
    step = optimizer steps done:

    - ``perf/images_per_sec``: training images per second over all processes (data loading,
      forward, backward and optimizer step included), averaged since the last log;
    - ``perf/step_time_s``: wall-clock seconds per optimizer step over the same interval;
    - ``perf/gpu_peak_mem_gb``: peak CUDA memory allocated since the last log (CUDA only).

    Costs one ``time.perf_counter()`` per batch; nothing synchronizes the GPU.
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        self.every_n_steps = every_n_steps
        self._start = 0.0
        self._images = 0
        self._first_step = 0

    def _reset(self, step: int) -> None:
        self._start, self._images, self._first_step = time.perf_counter(), 0, step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(trainer.global_step)
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += len(batch[0])
        step = trainer.global_step
        every = self.every_n_steps or trainer.log_every_n_steps
        if step == self._first_step or step % every != 0:
            return
        seconds = time.perf_counter() - self._start
        metrics = {
            "perf/images_per_sec": self._images * trainer.world_size / seconds,
            "perf/step_time_s": seconds / (step - self._first_step),
        }
        if pl_module.device.type == "cuda":
            metrics["perf/gpu_peak_mem_gb"] = (
                torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            )
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        self._reset(step)
