"""``python evaluate.py ckpt=...`` or ``images=folder/``: FID / IS / KID / precision-recall against
a dataset's cached reference features, an optional NFE sweep (table + plot) and bits/dim;
``ckpt=[a.ckpt,b.ckpt]`` scores several checkpoints against their EMA length (table + plot), and
``ema_sweep.sigma_rels=[...]`` the post-hoc EMA lengths of one ``ema=power`` run.
Results also go to a W&B run attached to the checkpoint's training run.

A shell: the plan is built and checked from the config (``evaluation/plan.py``), the checkpoints
read (``evaluation/procedures.py``), then the procedures run and the results are logged. On N
processes (torchrun, srun, submitit) the samples are shared out (docs/scaling.md)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from diffusionlab.cli.common import (
    log_file_per_process,
    run_cli,
    share_run_directory,
    user_errors_exit,
)
from diffusionlab.config import CONF_DIR
from diffusionlab.distributed import is_main, start_processes, stop_processes, together
from diffusionlab.evaluation.plan import EvaluationPlan
from diffusionlab.evaluation.procedures import load, run_evaluation
from diffusionlab.evaluation.protocol import Protocol
from diffusionlab.stopping import Stopped, requeue_slurm_job, stop_signals
from diffusionlab.tracking.loggers import finish_wandb_run
from diffusionlab.tracking.wandb_runs import log_curve, log_table, start_wandb_run


def evaluate(cfg: DictConfig) -> dict:
    """Run the evaluation described by ``cfg``; writes ``metrics.json`` to the run directory and
    logs ``eval/<metric>`` and the sweep tables to a W&B run (finished when this returns).

    Several processes (torchrun, srun, submitit) share the samples; rank 0 writes the files and
    the W&B run. A stop signal ends all of them within one batch; the features made so far are
    kept in the run directory, where a rerun continues from them."""
    with stop_signals(), finish_wandb_run():
        start_processes()
        log_file_per_process()
        try:
            return _evaluate(cfg)
        except Stopped as e:
            requeued = requeue_slurm_job(e.signal) if is_main() else None
            out = cfg.paths.output_dir
            raise Stopped(
                e.signal,
                f"{e}; metrics.json not written: the same command with hydra.run.dir={out} "
                "continues from the features kept there" + (f"; {requeued}" if requeued else ""),
            ) from None


def _evaluate(cfg: DictConfig) -> dict:
    with together():
        plan = EvaluationPlan.from_config(cfg)
    loaded = load(plan)  # every file read and checked before anything is logged
    run = None
    with together():
        if is_main():
            run = start_wandb_run(cfg, list(plan.ckpts))
    outcome = run_evaluation(plan, loaded)
    result = outcome.result
    with together():
        if run is not None:
            for c in outcome.curves:
                log_curve(run, f"eval/{c.table}", f"eval/{c.plot}", c.rows, c.x, c.series)
            run.log(
                {f"eval/{k}": v for k, v in {**result["metrics"], **result.get("bpd", {})}.items()}
            )
            if "protocol" in result:  # the metrics with the protocol they were measured under
                row = {**Protocol.from_dict(result["protocol"]).row(), **result["metrics"]}
                log_table(run, "eval/metrics_table", [row])
    return result


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
@user_errors_exit
def app(cfg: DictConfig) -> float | None:
    return evaluate(cfg)["metrics"].get("fid")


def main() -> None:
    """``evaluate.py`` / ``dl-evaluate``: user errors end as one ``error: ...`` line."""
    sys.argv = share_run_directory(sys.argv)
    try:
        run_cli(app, "evaluate")
    finally:
        stop_processes()


if __name__ == "__main__":
    main()
