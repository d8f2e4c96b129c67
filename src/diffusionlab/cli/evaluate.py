"""``python evaluate.py ckpt=...`` or ``images=folder/``: FID / IS / KID / precision-recall against
a dataset's cached reference features, an optional NFE sweep (table + plot) and bits/dim;
``ckpt=[a.ckpt,b.ckpt]`` scores several checkpoints against their EMA length (table + plot), and
``ema_sweep.sigma_rels=[...]`` the post-hoc EMA lengths of one ``ema=power`` run.
Results also go to a W&B run attached to the checkpoint's training run.

A shell: the plan is built and checked from the config (``evaluation/plan.py``), the checkpoints
read (``evaluation/procedures.py``), then the procedures run and the results are logged."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from diffusionlab.cli.common import run_cli, user_errors_exit
from diffusionlab.config import CONF_DIR
from diffusionlab.evaluation.plan import EvaluationPlan
from diffusionlab.evaluation.procedures import load, run_evaluation
from diffusionlab.evaluation.protocol import Protocol
from diffusionlab.tracking.loggers import finish_wandb_run
from diffusionlab.tracking.wandb_runs import log_curve, log_table, start_wandb_run


def evaluate(cfg: DictConfig) -> dict:
    """Run the evaluation described by ``cfg``; writes ``metrics.json`` to the run directory and
    logs ``eval/<metric>`` and the sweep tables to a W&B run (finished when this returns)."""
    plan = EvaluationPlan.from_config(cfg)
    loaded = load(plan)  # every file read and checked before anything is logged
    with finish_wandb_run():
        run = start_wandb_run(cfg, list(plan.ckpts))
        outcome = run_evaluation(plan, loaded)
        for c in outcome.curves:
            log_curve(run, f"eval/{c.table}", f"eval/{c.plot}", c.rows, c.x, c.series)
        result = outcome.result
        run.log({f"eval/{k}": v for k, v in {**result["metrics"], **result.get("bpd", {})}.items()})
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
    run_cli(app)


if __name__ == "__main__":
    main()
