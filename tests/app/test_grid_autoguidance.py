"""The training grid's autoguidance: the run's own EMA at guide_at * max_steps is the guide
(Karras et al. 2024), written to checkpoints/guide.ckpt for evaluate.py, carried through resume."""

import json

import numpy as np
import torch
from PIL import Image

from diffusionlab.cli.train import train
from diffusionlab.sampling.checkpoint import load_module
from diffusionlab.sampling.generator import generate
from diffusionlab.sampling.images import save_samples_png

from .helpers import compose_train, fast_overrides, run_app
from .test_user_errors import _train_error


def _run(tmp_path, extra):
    overrides = [
        *fast_overrides(tmp_path),
        "trainer.max_steps=4",
        "callbacks.sample_grid.every_n_steps=2",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "callbacks.sample_grid.guidance=3",
        "callbacks.sample_grid.guide_at=0.5",
        *extra,
    ]
    run = tmp_path / "run"
    train(compose_train(overrides, run))
    return run


def _png(path):
    return np.asarray(Image.open(path))


def _guide_state(ckpt):
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["callbacks"]
    (grid,) = [v for k, v in state.items() if k.startswith("SampleGrid")]
    return grid["guide"]


def test_guided_grids_and_guide_checkpoint(tmp_path):
    run = _run(tmp_path, ["callbacks.sample_grid.guide_at=0.75"])
    samples, ckpts = run / "samples", run / "checkpoints"
    assert sorted(p.name for p in samples.iterdir()) == [
        "step_000002.json",
        "step_000002.png",
        "step_000004.json",
        "step_000004.png",
        "step_000004_autoguided.png",
    ]
    record = json.loads((samples / "step_000004.json").read_text())
    assert record["images"] == {"step_000004.png": 1.0, "step_000004_autoguided.png": 3.0}
    assert record["guide_ckpt"] == "checkpoints/guide.ckpt" and record["guide_step"] == 3
    assert record["seeds"] == [0, 1, 2, 3] and record["labels"] is None
    assert record["sampler"]["name"] == "edm" and record["sampler"]["nfe"] == 3
    # guide.ckpt holds the EMA of step 3: the same weights as the periodic step-3 checkpoint
    cpu = torch.device("cpu")
    guide, step3, last = (
        load_module(str(ckpts / name), cpu)
        for name in ("guide.ckpt", "step_000003.ckpt", "last.ckpt")
    )
    for a, b in zip(guide.ema.parameters(), step3.ema.parameters(), strict=True):
        assert torch.equal(a, b)
    # the autoguided grid is last.ckpt guided by guide.ckpt (what evaluate.py guide_ckpt= does)
    guided = generate(last, range(4), guide=guide.ema, guidance=3.0)  # the run's sampler
    plain = generate(last, range(4))
    assert (guided - plain).abs().max() > 1e-3
    save_samples_png(guided, tmp_path / "guided.png")
    assert np.array_equal(
        _png(tmp_path / "guided.png"), _png(samples / "step_000004_autoguided.png")
    )


def test_guide_survives_resume(tmp_path):
    """Resumed at step 2 (after the guide was taken) into a fresh directory, without guide.ckpt:
    the guide comes from the checkpoint's callback state and is carried on unchanged."""
    full = _run(tmp_path / "a", [])
    resumed = _run(tmp_path / "b", [f"resume_ckpt={full / 'checkpoints' / 'step_000002.ckpt'}"])
    assert not (resumed / "checkpoints" / "guide.ckpt").exists()
    assert (resumed / "samples" / "step_000004_autoguided.png").exists()
    a, b = (
        _guide_state(full / "checkpoints" / "last.ckpt"),
        _guide_state(resumed / "checkpoints" / "last.ckpt"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_guidance_needs_max_steps(tmp_path):
    msg = _train_error(tmp_path, "trainer.max_steps=-1", "+trainer.max_epochs=1")
    assert "callbacks.sample_grid.guidance=2.0" in msg and "trainer.max_steps" in msg


def test_guide_at_out_of_range(tmp_path):
    msg = _train_error(tmp_path, "callbacks.sample_grid.guide_at=1.5")
    assert msg.startswith("callbacks.sample_grid.guide_at=1.5 must be in (0, 1)")


def test_readme_recognition_command(tmp_path):
    """README's default-run measurement, as written, on a tiny run (fewer samples)."""
    run = _run(tmp_path, [])
    cmd = (
        f"ckpt={run}/checkpoints/last.ckpt guide_ckpt={run}/checkpoints/guide.ckpt "
        "guidance=2 sampler=edm eval.recognition=true eval.metrics=[fid] eval.num_samples=2000"
    ).split()
    # dataset: train() in-process writes no .hydra/config.yaml to read it from
    fast = [
        "eval.num_samples=64",
        "sampler.nfe=3",
        "dataset=digits",
        f"eval.cache_dir={tmp_path / 'cache'}",
    ]
    res = run_app("evaluate.py", [*cmd, *fast, f"paths.output_dir={tmp_path / 'eval'}"])
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["guide_ckpt"].endswith("guide.ckpt")
    assert {"fid", "recognition_ratio", "classes_present"} <= metrics["metrics"].keys()
