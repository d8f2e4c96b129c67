"""``python train.py``: the training app (Hydra 1.3 + Lightning)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusionlab.cli.objective import optimized_value
from diffusionlab.config import CONF_DIR
from diffusionlab.data import DiffusionDataModule
from diffusionlab.errors import ConfigError
from diffusionlab.training.module import DiffusionModule

log = logging.getLogger(__name__)

# Intentional: the EMA copy lives in eval mode, and the CSV logger shares Hydra's run directory.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")


def _container(cfg: DictConfig | None) -> dict | None:
    return None if cfg is None else OmegaConf.to_container(cfg, resolve=True)


def build(cfg: DictConfig) -> tuple[DiffusionModule, DiffusionDataModule]:
    """Build data and model from the config and check they fit, before any training."""
    datamodule = DiffusionDataModule(instantiate(cfg.dataset, _partial_=True), **cfg.data)
    dataset = datamodule.dataset
    label_dim = int(cfg.label_dim)
    if label_dim and label_dim != dataset.num_classes:
        raise ConfigError(
            f"label_dim={label_dim} but dataset {cfg.dataset._target_} has "
            f"num_classes={dataset.num_classes}; use label_dim=0 or label_dim={dataset.num_classes}"
        )
    module = DiffusionModule(
        model=_container(cfg.model),
        schedule=_container(cfg.schedule),
        parameterization=_container(cfg.parameterization),
        loss=_container(cfg.loss),
        optimizer=_container(cfg.optimizer),
        ema=_container(cfg.ema),
        data_shape=list(dataset.shape),
        label_dim=label_dim,
        lr_warmup_steps=cfg.lr_warmup_steps,
        sampler=_container(cfg.sampler),
    )
    check_fits(module, dataset.shape)
    return module, datamodule


@torch.no_grad()
def check_fits(module: DiffusionModule, shape: tuple[int, ...]) -> None:
    """One forward pass on a zero batch: the network must map data shape to data shape."""
    x = torch.zeros(2, *shape)
    labels = module.one_hot(torch.zeros(2, dtype=torch.long)) if module.label_dim else None
    try:
        out = module.denoiser(x, torch.ones(2), class_labels=labels)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(
            f"model does not accept data of shape {tuple(shape)} "
            f"(dataset.resolution / dataset.channels): {e}"
        ) from e
    if out.shape != x.shape:
        raise ConfigError(
            f"model maps data of shape {tuple(shape)} to {tuple(out.shape[1:])}; "
            "check model.out_channels and dataset.resolution"
        )


def train(cfg: DictConfig) -> dict[str, float]:
    """Train from a composed config; returns the final logged metrics."""
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))
    try:
        module, datamodule = build(cfg)
        callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
        loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    except (ConfigError, InstantiationException) as e:
        raise SystemExit(f"error: {_root_message(e)}") from None
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and not Path(ckpt_path).is_file():
        raise SystemExit(f"error: ckpt_path={ckpt_path!r} does not exist")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def _root_message(e: BaseException) -> str:
    """The innermost user-facing message of an (instantiation) error chain."""
    cause = e
    while cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(e, InstantiationException) and cause is not e:
        key = getattr(e, "full_key", None) or str(e).split("full_key:")[-1].strip()
        return f"{cause} (config key: {key})"
    return str(cause)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    try:
        return optimized_value(metrics, cfg.get("optimized_metric"))
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
