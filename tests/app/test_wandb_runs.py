"""W&B runs as a user sees them, read back from the offline run files the apps write."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import wandb
from hydra import compose, initialize_config_dir

from app.wandb_log import offline_runs
from diffusionlab.cli.evaluate import evaluate
from diffusionlab.cli.sample import sample
from diffusionlab.config import CONF_DIR
from diffusionlab.evaluation.protocol import Protocol

from .helpers import fast_overrides, run_app


def run_offline(script: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """``python <script> <args>`` with W&B offline and every W&B directory inside ``tmp_path``."""
    return run_app(script, args, timeout=600, env=offline_env(tmp_path))


def offline_env(tmp_path: Path) -> dict[str, str]:
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        env[var] = str(tmp_path / "wandb_home")
    return env


def train_sweep(tmp_path: Path, sweep: list[str], extra: list[str] = ()) -> Path:
    """``train.py -m <sweep>`` of the tiny test run with the W&B logger; returns the sweep dir."""
    args = ["-m", *sweep, *fast_overrides(tmp_path), "logger=wandb", *extra]
    res = run_offline("train.py", args, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "already in progress" not in res.stderr
    (sweep_dir,) = (tmp_path / "train" / "multiruns").iterdir()
    return sweep_dir


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    """The issue's 2x2 grid, ``schedule=vp,edm parameterization=eps,v``, tagged."""
    tmp = tmp_path_factory.mktemp("grid")
    extra = ["tags=[grid,digits]", "wandb.project=dl-tests"]
    return train_sweep(tmp, ["schedule=vp,edm", "parameterization=eps,v"], extra)


def test_multirun_makes_one_named_run_per_job_in_one_group(grid):
    runs = offline_runs(grid)
    assert len({r.id for r in runs}) == 4
    # each job's files stay in its own run directory
    assert sorted(r.dir.parent.parent.name for r in runs) == ["0", "1", "2", "3"]
    assert sorted(r.name for r in runs) == sorted(
        f"schedule={s},parameterization={p}" for s in ("vp", "edm") for p in ("eps", "v")
    )
    for run in runs:
        assert run.group == grid.name and run.job_type == "train"
        assert run.tags == ["grid", "digits"] and run.exit_code == 0
        schedule, parameterization = (kv.split("=")[1] for kv in run.name.split(","))
        assert run.config["schedule"] == schedule
        assert run.config["parameterization"] == parameterization
        assert run.config["sampler"] == "edm" and run.config["dataset"] == "digits"
        assert run.config["schedule_cfg"]["_target_"].endswith(
            "VPSchedule" if schedule == "vp" else "EDMSchedule"
        )
        assert run.config["trainer_cfg"]["max_steps"] == 3 and run.config["seed"] == 42
        steps = [h["trainer/global_step"] for h in run.history if "train/loss" in h]
        assert steps == [0, 1, 2]
        assert [h["trainer/global_step"] for h in run.history if "train/lr" in h] == [0, 1, 2]
        # throughput every log_every_n_steps=1 step: images/s x s/step = images per step
        perf = [h for h in run.history if "perf/images_per_sec" in h]
        assert [h["trainer/global_step"] for h in perf] == [1, 2, 3]
        for row in perf:
            assert row["perf/images_per_sec"] * row["perf/step_time_s"] == pytest.approx(16)
            assert "perf/gpu_peak_mem_gb" not in row  # CPU run
        # the final sample grid: an image at the last step, its file in the run
        (image,) = [h for h in run.history if "samples/grid/_type" in h]
        assert image["trainer/global_step"] == 3
        assert image["samples/grid/_type"] == "images/separated"
        (png,) = image["samples/grid/filenames"]
        assert (run.dir / "files" / png).is_file()
        # beside it the autoguided grid (guide: the EMA at step round(0.15 * 3) -> 1)
        (guided,) = [h for h in run.history if "samples/grid_autoguided/_type" in h]
        assert guided["trainer/global_step"] == 3
        (png,) = guided["samples/grid_autoguided/filenames"]
        assert (run.dir / "files" / png).is_file()


EVAL = [
    "sampler=euler",
    "sampler.nfe=3",
    "eval.num_samples=32",
    "eval.extractor_steps=20",
    "eval.metrics=[fid]",
]


def test_evaluate_and_sample_runs_join_the_training_run(grid, tmp_path, monkeypatch):
    for var, value in offline_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    wandb.teardown()  # forget settings an earlier in-process test (W&B disabled) left behind
    train = next(r for r in offline_runs(grid) if r.dir.parent.parent.name == "0")
    ckpt = grid / "0" / "checkpoints" / "last.ckpt"
    cfg = _compose(
        "evaluate",
        [f"ckpt={ckpt}", *EVAL, "nfe_sweep.samplers=[euler,heun]", "nfe_sweep.nfe=[2,3]"]
        + [f"eval.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'eval'}"],
    )
    result = evaluate(cfg)
    out = tmp_path / "sample"
    sample(
        _compose(
            "sample", [f"ckpt={ckpt}", "num_samples=4", "sampler.nfe=3", f"paths.output_dir={out}"]
        )
    )
    wandb.teardown()  # in-process runs reach their files when the W&B service shuts down

    (run,) = offline_runs(tmp_path / "eval")
    assert run.job_type == "evaluate" and run.group == grid.name and run.exit_code == 0
    assert train.project == run.project == "dl-tests"  # wandb.project: null joins the train run's
    assert run.name == train.name  # no overrides of its own outside a Hydra app
    assert run.config["train_runs"][0]["id"] == train.id
    rows = run.table("eval/nfe_sweep")
    assert [(r["sampler"], r["nfe"]) for r in rows] == [
        ("euler", 2),
        ("euler", 3),
        ("heun", 2),
        ("heun", 3),
    ]
    # the sweep's (euler, 3) point is the main evaluation: same sampler, same seeds
    assert rows[1]["fid"] == run.summary["eval/fid"] == result["metrics"]["fid"]
    assert run.charts["eval/fid_vs_nfe"] == {"x": "nfe", "y": "fid", "stroke": "sampler"}
    # every row carries its protocol; the metrics table is the main result with its record
    assert [r["protocol.nfe"] for r in rows] == [2, 3, 2, 3]
    (table,) = run.table("eval/metrics_table")
    assert table["fid"] == result["metrics"]["fid"]
    assert Protocol.from_row(table) == Protocol.from_dict(result["protocol"])

    (run,) = offline_runs(out)
    assert run.job_type == "sample" and run.group == grid.name
    assert run.config["train_runs"][0]["id"] == train.id
    (image,) = [h for h in run.history if "samples/grid/path" in h]
    assert (run.dir / "files" / image["samples/grid/path"]).is_file()


@pytest.mark.slow
def test_fid_vs_ema_length_table(tmp_path, monkeypatch):
    sweep = train_sweep(tmp_path, ["ema.decay=0.5,0.9"], ["ema.warmup=false"])
    trains = {r.name: r for r in offline_runs(sweep)}
    assert set(trains) == {"ema.decay=0.5", "ema.decay=0.9"}
    args = ["ckpt=[{},{}]".format(*(sweep / j / "checkpoints" / "last.ckpt" for j in "10"))]
    args += [*EVAL, f"eval.cache_dir={tmp_path / 'cache'}", f"paths.log_dir={tmp_path}"]
    res = run_offline("evaluate.py", args, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]

    (run,) = offline_runs(tmp_path / "evaluate")
    assert run.job_type == "evaluate" and run.group == sweep.name
    assert run.config["sampler"] == "euler" and run.config["eval"] == "domain"
    assert run.name.startswith("sampler=euler,sampler.nfe=3")
    ids = [t["id"] for t in run.config["train_runs"]]
    assert ids == [trains["ema.decay=0.9"].id, trains["ema.decay=0.5"].id]
    rows = run.table("eval/ema_sweep")
    assert [r["ema_decay"] for r in rows] == [0.5, 0.9]  # sorted by EMA length
    assert rows[0]["fid"] != rows[1]["fid"]
    assert run.summary["eval/fid"] == min(r["fid"] for r in rows)
    assert run.charts["eval/fid_vs_ema"] == {"x": "ema_decay", "y": "fid", "stroke": None}
    (csv,) = (tmp_path / "evaluate").rglob("ema_sweep.csv")
    assert (csv.parent / "fid_vs_ema.png").is_file()


@pytest.mark.slow
def test_ddp_writes_one_run_from_rank_zero(tmp_path):
    args = ["trainer=ddp_cpu", *fast_overrides(tmp_path), "logger=wandb"]
    res = run_offline("train.py", args, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = offline_runs(tmp_path)  # rank 1 writes no run
    assert len(list(tmp_path.rglob("*.wandb"))) == 1
    assert [h["trainer/global_step"] for h in run.history if "train/loss" in h] == [0, 1, 2]
    assert run.exit_code == 0 and run.config["trainer"] == "ddp_cpu"
    # images/s counts both processes: the global batch of 16 (8 per process) per step
    for row in [h for h in run.history if "perf/images_per_sec" in h]:
        assert row["perf/images_per_sec"] * row["perf/step_time_s"] == pytest.approx(16)
