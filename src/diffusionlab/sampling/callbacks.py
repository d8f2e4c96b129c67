"""The training-time sample grid: fixed seeds drawn from the EMA weights through the generator,
written as PNG and sent to loggers, and beside it the same seeds with autoguidance by the run's
own early EMA."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import lightning as L
from torch import Tensor

from diffusionlab.diffusion.parameterizations import Denoiser
from diffusionlab.errors import ConfigError
from diffusionlab.sampling.conditioning import condition_of
from diffusionlab.sampling.generator import generate
from diffusionlab.sampling.images import log_image, save_samples_png
from diffusionlab.sampling.spec import SamplerSpec

log = logging.getLogger(__name__)


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` steps and at the end of training, sample ``n`` images (or points)
    from seeds ``seed .. seed + n - 1`` with the EMA denoiser and save ``samples/step_XXXXXX.png``.

    Class-conditional models get label ``i % label_dim`` for sample ``i`` (one class per column
    when ``n`` is a multiple of ``label_dim``); text-conditioned ones prompt ``i % P`` of their
    ``cond.prompts``; image-conditioned ones upsample the first ``n`` training images.

    With ``guidance`` != 1, the EMA denoiser at step ``round(guide_at * max_steps)`` is kept as an
    autoguidance guide (Karras et al. 2024, eq. 1: D_guide + w (D - D_guide), the guide being the
    same network trained for less time) and written to ``checkpoints/guide.ckpt`` (for
    ``evaluate.py guide_ckpt=``); every later grid is also drawn guided, from the same seeds, as
    ``samples/step_XXXXXX_autoguided.png``. The guide travels in the callback's checkpoint state,
    so a resumed run draws the same guided grids.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        n: int = 64,
        seed: int = 0,
        sampler: dict | None = None,
        dirname: str = "samples",
        guidance: float = 1.0,
        guide_at: float = 0.15,
    ) -> None:
        if guidance != 1.0 and not 0.0 < guide_at < 1.0:
            raise ConfigError(
                f"callbacks.sample_grid.guide_at={guide_at} must be in (0, 1): the fraction of "
                "trainer.max_steps at which the autoguidance guide is taken"
            )
        self.every_n_steps = every_n_steps
        self.n = n
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
        return condition.grid_values(self.n, pl_module.device, data)

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

    def _save(self, trainer: L.Trainer, x: Tensor, suffix: str, key: str) -> None:
        step = trainer.global_step
        path = Path(trainer.default_root_dir) / self.dirname / f"step_{step:06d}{suffix}.png"
        save_samples_png(x.cpu(), path)
        log.info("sample grid: %s", path)
        for logger in trainer.loggers:
            log_image(logger, key, path, step)

    def _sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        was_training = pl_module.training
        pl_module.eval()
        seeds = range(self.seed, self.seed + self.n)
        labels = self._values(trainer, pl_module)
        x = generate(pl_module, seeds, conditions=labels, sampler=self.sampler)
        guide = self._guide_denoiser(pl_module)
        if guide is not None:
            guided = generate(
                pl_module,
                seeds,
                conditions=labels,
                sampler=self.sampler,
                guide=guide,
                guidance=self.guidance,
            )
        pl_module.train(was_training)
        if not trainer.is_global_zero:
            return
        self._save(trainer, x, "", "samples/grid")
        if guide is not None:
            self._save(trainer, guided, "_autoguided", "samples/grid_autoguided")

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
            self._sample(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sample(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        guide = self._guide.state_dict() if self._guide is not None else self._guide_state
        return {"guide": guide} if guide is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._guide, self._guide_state = None, state_dict.get("guide")
