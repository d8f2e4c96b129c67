"""Which optimizer steps log: per-step diagnostics are computed only on those."""

from __future__ import annotations

import lightning as L


def is_logging_step(trainer: L.Trainer) -> bool:
    """True on the steps whose metrics reach the loggers (``trainer.log_every_n_steps``) and on
    the last step. Valid before the step's optimizer update (``training_step``,
    ``on_before_optimizer_step``), when ``trainer.global_step`` still counts the steps done."""
    last = trainer.max_steps > 0 and trainer.global_step + 1 >= trainer.max_steps
    return last or trainer._logger_connector.should_update_logs
