"""sample.py / evaluate.py: folders of PNGs scored in-process; the checkpoint path end to end (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from diffusionlab.cli.evaluate import evaluate
from diffusionlab.config import CONF_DIR
from diffusionlab.data.datasets import split_indices
from diffusionlab.errors import ConfigError
from diffusionlab.sampling.images import to_uint8_rgb


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def _write_pngs(images: torch.Tensor, folder) -> None:
    folder.mkdir()
    for i, img in enumerate(to_uint8_rgb(images)[:, 0].numpy()):
        Image.fromarray(img).save(folder / f"{i:06d}.png")


def test_evaluate_image_folders(mnist, domain, cache_dir, tmp_path):
    test = mnist.images[split_indices(len(mnist), "test")][
        ::3
    ]  # all classes (data sorted by class)
    _write_pngs(test, tmp_path / "real")
    noise = torch.rand(test.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    _write_pngs(noise, tmp_path / "noise")
    fids = {}
    for name in ("real", "noise"):
        cfg = _compose(
            "evaluate",
            [
                f"images={tmp_path / name}",
                "dataset=mnist16",
                f"eval.cache_dir={cache_dir}",
                "eval.split=train",
                "eval.metrics=[fid,prc]",
                f"paths.output_dir={tmp_path / ('out_' + name)}",
            ],
        )
        fids[name] = evaluate(cfg)["metrics"]["fid"]
        saved = json.loads((tmp_path / f"out_{name}" / "metrics.json").read_text())
        assert saved["metrics"]["fid"] == fids[name]
    assert 0 < fids["real"] < 10 < fids["noise"]


def test_evaluate_needs_exactly_one_input(tmp_path):
    cfg = _compose("evaluate", ["dataset=mnist16", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="ckpt=... or images=..."):
        evaluate(cfg)
    cfg = _compose("evaluate", ["ckpt=/nonexistent.ckpt", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="no reference dataset"):
        evaluate(cfg)


@pytest.mark.slow
def test_sample_and_evaluate_a_checkpoint(tmp_path):
    from app.helpers import fast_overrides, run_app

    train = run_app("train.py", [*fast_overrides(tmp_path), "dataset=mnist16", "label_dim=10"])
    assert train.returncode == 0, train.stderr[-2000:]
    ckpt = next(tmp_path.rglob("last.ckpt"))
    out = tmp_path / "samples"
    args = [
        f"ckpt={ckpt}",
        "sampler=euler",
        "sampler.nfe=3",
        "num_samples=10",
        "batch_size=4",
        "npz=true",
    ]
    res = run_app("sample.py", [*args, f"outdir={out}", f"paths.log_dir={tmp_path}"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(list(out.glob("0*.png"))) == 10 and (out / "grid.png").is_file()
    npz = np.load(out / "samples.npz")
    assert npz["samples"].shape == (10, 16, 16, 1) and npz["labels"].shape == (10,)
    res = run_app(
        "evaluate.py",
        [
            f"ckpt={ckpt}",
            "sampler=euler",
            "sampler.nfe=3",
            "eval.num_samples=40",
            "eval.repeats=2",
            "eval.extractor_steps=30",
            "eval.metrics=[fid,kid]",
            f"eval.cache_dir={tmp_path / 'cache'}",
            "nfe_sweep.samplers=[euler]",
            "nfe_sweep.nfe=[2,3]",
            "bpd.num_images=2",
            "bpd.tolerance=1e-3",
            f"paths.log_dir={tmp_path}",
        ],
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    run = next(tmp_path.rglob("nfe_sweep.csv")).parent
    assert (run / "fid_vs_nfe.png").is_file()
    result = json.loads((run / "metrics.json").read_text())
    assert result["metrics"]["fid_min"] <= result["metrics"]["fid_mean"]
    assert [r["nfe"] for r in result["sweep"]] == [2, 3]
    assert result["bpd"]["bpd"] > 0
