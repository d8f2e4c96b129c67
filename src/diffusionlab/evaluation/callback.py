"""FID (and friends) of the EMA weights every N training steps, logged as ``eval/<metric>``."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L

from diffusionlab.evaluation.evaluator import Evaluator, dataset_key
from diffusionlab.evaluation.metrics import METRICS
from diffusionlab.sampling.generator import DiffusionGenerator
from diffusionlab.sampling.spec import SamplerSpec
from diffusionlab.stopping import Stopped, received

log = logging.getLogger(__name__)


class FIDCallback(L.Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end of training when ``at_end``),
    sample ``num_samples`` images from seeds ``seed ..`` with the EMA denoiser and the ``sampler``
    config (a :class:`~diffusionlab.sampling.spec.SamplerSpec` node), score them against the training data
    and log ``eval/fid`` etc. to every logger. Work is shared over DDP processes. A stop signal
    ends it within one batch: skipped during training (the run stops at that step), the end of
    the run after the last step.

    ``dataset`` is the dataset config's ``_target_`` (it names the cache entries); the domain
    extractor is trained on first use (``extractor_steps`` steps) and cached in ``cache_dir``.
    """

    def __init__(
        self,
        dataset: str,
        cache_dir: str,
        every_n_steps: int = 5000,
        num_samples: int = 1000,
        sampler: dict | None = None,
        extractor: str = "domain",
        inception_weights: str | None = None,
        metrics: Sequence[str] = ("fid", "kid", "prc"),
        seed: int = 0,
        batch_size: int = 64,
        at_end: bool = True,
        extractor_steps: int = 300,
    ) -> None:
        unknown = set(metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"callbacks.fid.metrics has unknown {sorted(unknown)}")
        self.dataset = dataset
        self.cache_dir = Path(cache_dir)
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.sampler = SamplerSpec.from_config(sampler, key="callbacks.fid.sampler")
        self.extractor = extractor
        self.inception_weights = inception_weights
        self.metrics = list(metrics)
        self.seed = seed
        self.batch_size = batch_size
        self.at_end = at_end
        self.extractor_steps = extractor_steps
        self._evaluator: Evaluator | None = None
        self.last: dict[str, float] = {}

    def _evaluator_for(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Evaluator:
        if self._evaluator is None:
            data = trainer.datamodule.dataset
            self._evaluator = Evaluator(
                getattr(data, "source", data),  # a latent dataset's source images
                dataset_key(self.dataset),
                self.cache_dir,
                extractor=self.extractor,
                inception_weights=self.inception_weights,
                metrics=self.metrics,
                extractor_steps=self.extractor_steps,
                device=pl_module.device,
            )
        return self._evaluator

    def evaluate(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> tuple[dict[str, float], float]:
        """Score the EMA weights now: (metrics, the same on every process; seconds spent)."""
        evaluator = self._evaluator_for(trainer, pl_module)
        generator = DiffusionGenerator.from_module(pl_module, self.sampler)
        t0 = time.time()
        seeds = range(self.seed, self.seed + self.num_samples)
        return evaluator.score_generator(generator, [seeds], self.batch_size), time.time() - t0

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        try:
            metrics, seconds = self.evaluate(trainer, pl_module)
        except Stopped as e:  # the step's checkpoint and stop follow (training.preemption)
            log.warning("%s: FID of step %d not computed", e.signal, trainer.global_step)
            return
        self.last = metrics
        for key, value in metrics.items():
            pl_module.log(f"eval/{key}", value, on_step=True, on_epoch=False, sync_dist=False)
        if trainer.is_global_zero:
            log.info("step %d: %s (%.1fs)", trainer.global_step, metrics, seconds)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation: the step is not complete
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if received():  # stopped by a signal, not finished: no final FID
            return
        if self.at_end and trainer.global_step % max(self.every_n_steps, 1) != 0:
            if trainer.is_global_zero:
                log.info("end of training (step %d): FID", trainer.global_step)
            metrics, _ = self.evaluate(trainer, pl_module)  # a stop signal ends the run here
            self.last = metrics
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(
                        {f"eval/{k}": v for k, v in metrics.items()}, trainer.global_step
                    )
