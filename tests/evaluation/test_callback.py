"""The FID callback inside a real (tiny) training run logs eval/fid to the CSV logger."""

from __future__ import annotations

import csv
import math

from app.helpers import compose_train, fast_overrides
from diffusionlab.cli.train import train


def test_fid_callback_logs_val_fid(tmp_path):
    overrides = [
        *fast_overrides(tmp_path, callbacks=False),
        "+eval@callbacks.fid=fid_callback",
        "callbacks.fid.every_n_steps=2",
        "callbacks.fid.num_samples=20",
        "callbacks.fid.extractor_steps=20",
        "callbacks.fid.metrics=[fid,kid]",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "label_dim=10",
    ]
    cfg = compose_train(overrides, tmp_path / "run")
    metrics = train(cfg)
    assert math.isfinite(metrics["eval/fid"]) and metrics["eval/fid"] > 0
    assert (tmp_path / "cache" / "extractors" / "digits-8-v2.pt").is_file()
    assert (tmp_path / "cache" / "fid-refs" / "digits-all-8-dl-domain-digits-8-v2.pt").is_file()
    with open(next((tmp_path / "run").rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("eval/fid")]
    assert logged and "eval/kid_mean" in rows[0]
