"""The training-time sample grid: fixed seeds drawn from the EMA weights through the generator,
written as PNG and sent to loggers, and beside it the same seeds with autoguidance by the run's
own early EMA; each step's settings are recorded beside its PNGs (``sampling/grid_record.py``),
so ``sample.py from_run=<run>`` draws them again."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from diffusionlab.diffusion.guidance import check_guidance_interval
from diffusionlab.diffusion.parameterizations import Denoiser
from diffusionlab.errors import ConfigError
from diffusionlab.sampling.conditioning import condition_of
from diffusionlab.sampling.grid_record import (
    GridRecord,
    draw_grid,
    record_path,
    write_record,
)
from diffusionlab.sampling.images import log_image, save_samples_png
from diffusionlab.sampling.spec import SamplerSpec
from diffusionlab.stopping import Stopped, received

log = logging.getLogger(__name__)


def _channels_last(module: L.LightningModule) -> bool:
    """Whether the network's 4-D weights are stored NHWC (``channels_last=true``)."""
    return any(
        p.dim() == 4
        and p.is_contiguous(memory_format=torch.channels_last)
        and not p.is_contiguous()
        for p in module.parameters()
    )


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` steps and at the end of training, sample ``num_samples`` images
    (or points) from seeds ``seed .. seed + num_samples - 1`` with the EMA denoiser and the
    ``sampler`` spec (None: the run's, stored with the model) and save
    ``samples/step_XXXXXX.png``, with its record ``samples/step_XXXXXX.json``.
    A stop signal ends a grid within one network evaluation: during training the grid is
    skipped and the run stops at that step (``training/preemption.py``); at the end of training
    the run ends there with :class:`~diffusionlab.stopping.Stopped`.

    Class-conditional models get label ``i % label_dim`` for sample ``i`` (one class per column
    when ``num_samples`` is a multiple of ``label_dim``); text-conditioned ones prompt ``i % P``
    of their ``cond.prompts``; image-conditioned ones upsample the first ``num_samples`` training
    images.

    With ``guidance`` != 1, the EMA denoiser at step ``round(guide_at * max_steps)`` is kept as an
    autoguidance guide (Karras et al. 2024, eq. 1: D_guide + w (D - D_guide), the guide being the
    same network trained for less time) and written to ``checkpoints/guide.ckpt`` (for
    ``evaluate.py guide_ckpt=``); every later grid is also drawn guided, from the same seeds, as
    ``samples/step_XXXXXX_autoguided.png`` (guided only for sigma in ``guidance_interval`` when
    set). The guide travels in the callback's checkpoint state, so a resumed run draws the same
    guided grids.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        num_samples: int = 64,
        seed: int = 0,
        sampler: dict | None = None,
        dirname: str = "samples",
        guidance: float = 1.0,
        guide_at: float = 0.15,
        guidance_interval: list[float] | None = None,
    ) -> None:
        if guidance != 1.0 and not 0.0 < guide_at < 1.0:
            raise ConfigError(
                f"callbacks.sample_grid.guide_at={guide_at} must be in (0, 1): the fraction of "
                "trainer.max_steps at which the autoguidance guide is taken"
            )
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.seed = seed
        # None: the sampler stored with the model (its training config's)
        self.sampler = (
            SamplerSpec.from_config(sampler, key="callbacks.sample_grid.sampler")
            if sampler
            else None
        )
        self.dirname = dirname
        self.guidance = float(guidance)
        self.guide_at = guide_at
        self.guidance_interval = check_guidance_interval(
            guidance_interval, "callbacks.sample_grid.guidance_interval"
        )
        self.guide_step: int | None = None
        self._guide: Denoiser | None = None
        self._guide_state: dict[str, Tensor] | None = None

    def _values(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Tensor | None:
        """The grid's condition values (class ``i % label_dim`` for sample ``i``, ...); None
        for unconditional models."""
        condition = condition_of(pl_module)
        if condition is None:
            return None
        data = getattr(getattr(trainer, "datamodule", None), "dataset", None)
        return condition.grid_values(self.num_samples, pl_module.device, data)

    def _guide_denoiser(self, pl_module: L.LightningModule) -> Denoiser | None:
        """The guide, rebuilt from the checkpoint state after a resume; None before it is taken."""
        if self._guide is None and self._guide_state is not None:
            self._guide = copy.deepcopy(pl_module.ema)
            self._guide.load_state_dict(self._guide_state)
            self._guide_state = None
        return self._guide

    def _take_guide(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._guide = copy.deepcopy(pl_module.ema).eval()
        path = Path(trainer.default_root_dir) / "checkpoints" / "guide.ckpt"
        trainer.save_checkpoint(path, weights_only=True)
        log.info("autoguidance guide (EMA at step %d): %s", trainer.global_step, path)

    def _save(self, trainer: L.Trainer, x: Tensor, suffix: str, key: str) -> Path:
        step = trainer.global_step
        path = Path(trainer.default_root_dir) / self.dirname / f"step_{step:06d}{suffix}.png"
        save_samples_png(x.cpu(), path)
        log.info("sample grid: %s", path)
        for logger in trainer.loggers:
            log_image(logger, key, path, step)
        return path

    def _sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        was_training = pl_module.training
        pl_module.eval()
        seeds = list(range(self.seed, self.seed + self.num_samples))
        values = self._values(trainer, pl_module)
        spec = self.sampler or SamplerSpec.of(pl_module.hparams.sampler)
        x = draw_grid(pl_module, seeds, values, spec)
        guide = self._guide_denoiser(pl_module)
        if guide is not None:
            guided = draw_grid(
                pl_module, seeds, values, spec, guide, self.guidance, self.guidance_interval
            )
        pl_module.train(was_training)
        if not trainer.is_global_zero:
            return
        plain = self._save(trainer, x, "", "samples/grid")
        images = {plain.name: 1.0}
        if guide is not None:
            path = self._save(trainer, guided, "_autoguided", "samples/grid_autoguided")
            images[path.name] = self.guidance
        record = GridRecord(
            step=trainer.global_step,
            seeds=tuple(seeds),
            # class labels or prompt indices; None for images (an image-conditioned grid)
            labels=tuple(values.tolist()) if values is not None and values.ndim == 1 else None,
            sampler=spec.to_dict(),
            channels_last=_channels_last(pl_module),
            images=images,
            guide_ckpt="checkpoints/guide.ckpt" if guide is not None else None,
            guide_step=self.guide_step if guide is not None else None,
            guidance_interval=list(self.guidance_interval) if self.guidance_interval else None,
        )
        write_record(record_path(plain), record)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.guidance == 1.0:
            return
        if trainer.max_steps is None or trainer.max_steps <= 0:
            raise ConfigError(
                f"callbacks.sample_grid.guidance={self.guidance} takes its autoguidance guide at "
                "a fraction of trainer.max_steps: set trainer.max_steps (or guidance=1)"
            )
        self.guide_step = max(1, round(self.guide_at * trainer.max_steps))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation: the step is not complete
        step = trainer.global_step
        if step == self.guide_step:
            self._take_guide(trainer, pl_module)
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            try:
                self._sample(trainer, pl_module)
            except Stopped as e:  # the step's checkpoint and stop follow (training.preemption)
                log.warning("%s: sample grid of step %d not drawn", e.signal, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if received():  # stopped by a signal, not finished: no final grid
            return
        log.info(
            "end of training (step %d): sample grid of %d", trainer.global_step, self.num_samples
        )
        self._sample(trainer, pl_module)  # a stop signal here ends the run (Stopped)

    def state_dict(self) -> dict[str, Any]:
        guide = self._guide.state_dict() if self._guide is not None else self._guide_state
        return {"guide": guide} if guide is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._guide, self._guide_state = None, state_dict.get("guide")
