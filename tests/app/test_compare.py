"""``dl-compare`` on a real 4-job sweep of train.py: table (markdown + CSV) and both PNGs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from diffusionlab.cli.compare import compare
from diffusionlab.config import CONF_DIR
from diffusionlab.errors import ConfigError
from diffusionlab.evaluation.sweep import parse_overrides, short_value, varying_keys
from diffusionlab.evaluation.sweep_plots import smoothed

from .helpers import ROOT, fast_overrides, run_app


def run_compare(args: list[str]) -> subprocess.CompletedProcess:
    """``python -m diffusionlab.cli.compare <args>`` (the ``dl-compare`` console script)."""
    return subprocess.run(
        [sys.executable, "-m", "diffusionlab.cli.compare", *args],
        cwd=ROOT,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """docs/sweeps.md's sweep, 3 steps a job: 2 learning rates x 2 EMA decays, FID at the end."""
    tmp = tmp_path_factory.mktemp("compare")
    args = [
        "-m",
        *fast_overrides(tmp),
        "callbacks.sample_grid.num_samples=16",
        "~callbacks.model_checkpoint",
    ]
    args += [
        "+eval@callbacks.fid=fid_callback",
        "callbacks.fid.every_n_steps=3",
        "callbacks.fid.num_samples=20",
        "callbacks.fid.extractor_steps=20",
        "callbacks.fid.metrics=[fid,kid]",
        f"paths.cache_dir={tmp / 'cache'}",
        "label_dim=10",
        f"hydra.sweep.dir={tmp / 'sweep'}",
        "optimizer.lr=1e-3,3e-3",
        "ema.decay=0.99,0.999",
    ]
    result = run_app("train.py", args)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "sweep"


def test_compare_writes_table_and_figures_of_a_four_job_sweep(sweep, tmp_path):
    out = tmp_path / "report"
    result = run_compare([f"sweep_dir={sweep}", f"outdir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _read_csv(out / "compare.csv")
    assert list(rows[0]) == [
        "job",
        "optimizer.lr",
        "ema.decay",
        "step",
        "train/loss",
        "eval/fid",
        "eval/kid_mean",
    ]
    assert [(r["job"], r["optimizer.lr"], r["ema.decay"]) for r in rows] == [
        ("0", "0.001", "0.99"),
        ("1", "0.001", "0.999"),
        ("2", "0.003", "0.99"),
        ("3", "0.003", "0.999"),
    ]
    for row in rows:
        logged = _read_csv(sweep / row["job"] / "metrics.csv")
        last_loss = [r["train/loss"] for r in logged if r["train/loss"]][-1]
        fids = [r["eval/fid"] for r in logged if r["eval/fid"]]
        assert row["train/loss"] == last_loss and len(fids) == 1 and row["eval/fid"] == fids[0]
        assert float(row["eval/fid"]) > 0 and row["step"] == "2"  # the last logged step
    md = (out / "compare.md").read_text().splitlines()
    table = [line for line in md if line.startswith("| ")]
    assert len(table) == 5 and table[0].startswith("| job | optimizer.lr | ema.decay |")
    assert any(line.startswith("Shared overrides:") and "`dataset=digits`" in line for line in md)
    assert Image.open(out / "loss_curves.png").size == (700, 450)
    width, height = Image.open(out / "samples_grid.png").size
    assert 1000 <= width <= 1300 and 250 <= height <= 450  # 4 panels in one row
    assert not (sweep / "compare.csv").exists()  # outdir= was honoured


def test_compare_writes_into_the_sweep_by_default(sweep):
    paths = compare(_compose_compare([f"sweep_dir={sweep}", "columns=2"]))
    assert {p.parent for p in paths.values()} == {sweep}
    width, height = Image.open(paths["samples_grid.png"]).size
    assert height > width / 2  # 2 x 2 panels
    assert len(_read_csv(paths["compare.csv"])) == 4


def _compose_compare(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="compare", overrides=overrides)


def test_compare_refuses_what_is_not_a_sweep(sweep, tmp_path):
    with pytest.raises(ConfigError, match="is a single run"):
        compare(_compose_compare([f"sweep_dir={sweep / '0'}"]))
    with pytest.raises(ConfigError, match="holds no job folders"):
        compare(_compose_compare([f"sweep_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="is not a folder"):
        compare(_compose_compare([f"sweep_dir={tmp_path / 'missing'}"]))
    result = run_compare([])
    assert result.returncode != 0 and "error: pass sweep_dir=" in result.stderr


def test_overrides_labels_and_smoothing():
    jobs_overrides = [
        parse_overrides(["dataset=digits", "optimizer.lr=0.00024156772", "~callbacks.x=null"]),
        parse_overrides(["dataset=digits", "optimizer.lr=0.001", "~callbacks.x=null"]),
    ]
    assert jobs_overrides[0]["~callbacks.x"] == "null"

    class _Job:
        def __init__(self, overrides):
            self.overrides = overrides

    assert varying_keys([_Job(o) for o in jobs_overrides]) == ["optimizer.lr"]
    assert short_value("0.00024156772") == "0.0002416" and short_value("256") == "256"
    assert short_value("edm") == "edm"
    # bias-corrected EMA: [1, 3] with weight 0.5 -> [1, (0.25 + 1.5) / 0.75]
    assert smoothed([1.0, 3.0], 0.5) == pytest.approx([1.0, 7 / 3])
    assert smoothed([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert smoothed([1.0, 5.0], 0.0) == [1.0, 5.0]
