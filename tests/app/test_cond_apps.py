"""The real Hydra apps with text and image conditions on the CPU (docs/conditioning.md): a
text-conditioned run on the captioned MNIST sampled with prompts, prompt files and negative
prompts; a tiny CLIP from a temporary folder conditioning training and sampling; a
super-resolution run upsampling files, a cascade and the held-out data; every user error a
single message naming the key or file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionlab.cli.train import train
from diffusionlab.diffusion.parameterizations import FlowMapParam
from diffusionlab.errors import ConfigError
from diffusionlab.sampling.checkpoint import load_module
from tiny_text_encoders import tiny_clip

from .helpers import compose_train, fast_overrides, run_app

TEXT = [
    "experiment=text_mnist",
    "dataset=text_mnist",
    "cond.encoder.width=16",
    "cond.encoder.depth=1",
]


def _train(tmp: Path, overrides: list[str]) -> Path:
    cfg = compose_train([*fast_overrides(tmp), "trainer.max_steps=2", *overrides], tmp / "run")
    train(cfg)
    return tmp / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("text"), [*TEXT, "data.batch_size=8"])


@pytest.fixture(scope="module")
def sr_ckpt(tmp_path_factory) -> Path:
    return _train(
        tmp_path_factory.mktemp("sr"),
        ["experiment=sr_mnist", "dataset=mnist", "data.batch_size=4", "model.model_channels=8"],
    )


def test_text_run_samples_prompts_files_and_negative_prompts(text_ckpt, tmp_path):
    grids = list((text_ckpt.parents[1] / "samples").glob("*.png"))
    assert grids, "the training grid of a text model (its cond.prompts) was not drawn"
    module = load_module(str(text_ckpt), "cpu")
    assert module.cond.kind == "text" and hasattr(module.ema, "cond_encoder")
    out = tmp_path / "one"
    args = [f"ckpt={text_ckpt}", "num_samples=3", "sampler.nfe=3", f"outdir={out}", "npz=true"]
    res = run_app(
        "sample.py",
        [*args, "prompt=a handwritten seven", "guidance=3", "negative_prompt=a handwritten one"],
    )
    assert res.returncode == 0, res.stderr[-2000:]
    data = np.load(out / "samples.npz")
    assert data["samples"].shape == (3, 16, 16, 1)
    assert list(data["prompts"]) == ["a handwritten seven"] * 3
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("7\ta handwritten seven\nthe digit 1\n")
    out2 = tmp_path / "file"
    res = run_app("sample.py", [*args[:3], f"outdir={out2}", f"prompts_file={prompts}", "npz=true"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in out2.glob("p*.png"))[:4] == [
        "p000_000000.png",
        "p000_000001.png",
        "p000_000002.png",
        "p001_000000.png",
    ]
    data = np.load(out2 / "samples.npz")
    assert list(data["prompts"]) == ["a handwritten seven"] * 3 + ["the digit 1"] * 3
    # autoguidance with text: the model as its own guide is D_g + w (D - D_g) = D, the plain
    # conditional model (the guide encodes the prompt with its own copy of the encoder)
    out3 = tmp_path / "guided"
    guided = [*args[:3], f"outdir={out3}", "prompt=a handwritten seven", "guidance=2"]
    res = run_app("sample.py", [*guided, f"guide_ckpt={text_ckpt}"])
    assert res.returncode == 0, res.stderr[-2000:]
    for seed in range(3):
        a = np.asarray(Image.open(out3 / f"{seed:06d}.png")).astype(int)
        b = np.asarray(Image.open(out2 / f"p000_{seed:06d}.png")).astype(int)
        assert np.abs(a - b).max() <= 1
    autoguided = text_ckpt.parents[1] / "samples"
    assert list(autoguided.glob("*_autoguided.png")), "no autoguided training grid"


@pytest.mark.slow  # trains the domain classifier
def test_prompt_accuracy_app(text_ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("7\ta handwritten seven\n1\tthe digit 1\n")
    res = run_app(
        "src/diffusionlab/cli/prompt_accuracy.py",
        [
            f"ckpt={text_ckpt}",
            f"prompts_file={prompts}",
            "guidance=[1,3]",
            "num_samples=2",
            "sampler.nfe=3",
            "extractor_steps=10",
            f"cache_dir={tmp_path / 'cache'}",
            f"outdir={tmp_path / 'out'}",
        ],
    )
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics["weights"]) == {"1.0", "3.0"}
    for v in metrics["weights"].values():
        assert 0 <= v["accuracy"] <= 1 and set(v["per_label"]) == {"1", "7"}
        assert set(v["per_prompt"]) == {"a handwritten seven", "the digit 1"}
    assert (tmp_path / "out" / "grid_w3.png").is_file()
    assert "| guidance | accuracy |" in (tmp_path / "out" / "accuracy.md").read_text()


def test_tiny_clip_from_a_folder_conditions_training_and_sampling(tmp_path):
    folder = tiny_clip(tmp_path / "clip")
    ckpt = _train(
        tmp_path,
        [
            *TEXT,
            "cond.encoder.kind=clip",
            f"cond.encoder.path={folder}",
            "cond.encoder.max_length=8",
            "data.batch_size=8",
        ],
    )
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert not any("cond_encoder" in k or "text_model" in k for k in state)  # frozen: not saved
    module = load_module(str(ckpt), "cpu")
    assert module.text_encoder().kind == "clip"
    args = [f"ckpt={ckpt}", "num_samples=2", "sampler.nfe=3", "prompt=digit seven", "guidance=2"]
    res = run_app("sample.py", [*args, f"outdir={tmp_path / 's'}"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(list((tmp_path / "s").glob("0*.png"))) == 2
    shutil.rmtree(folder)  # the checkpoint keeps the path, not the weights
    res = run_app("sample.py", [*args, f"outdir={tmp_path / 't'}"])
    assert res.returncode == 1
    assert "cond.encoder.path=" in res.stderr and "is not a folder" in res.stderr


@pytest.mark.slow  # trains the domain classifier
def test_super_resolution_inputs_cascade_and_evaluation(sr_ckpt, text_ckpt, tmp_path):
    assert list((sr_ckpt.parents[1] / "samples").glob("*.png")), "no training grid"
    low = (np.arange(2 * 16 * 16) % 255).astype(np.uint8).reshape(2, 16, 16, 1)
    np.savez(tmp_path / "low.npz", samples=low)
    base = ["sampler.nfe=3", "batch_size=2"]
    # in-process training wrote no .hydra/config.yaml: name the reference data
    scored = [*base, "dataset=mnist", "extractor_steps=10", f"cache_dir={tmp_path / 'cache'}"]
    res = run_app(
        "src/diffusionlab/cli/upsample.py",
        [f"ckpt={sr_ckpt}", f"inputs={tmp_path / 'low.npz'}", f"outdir={tmp_path / 'a'}", *base],
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(list((tmp_path / "a").glob("0*.png"))) == 2
    assert Image.open(tmp_path / "a" / "000000.png").size == (32, 32)
    # cascade: a 16x16 base model (here the text model, prompts drawn from its cond.prompts)
    res = run_app(
        "src/diffusionlab/cli/upsample.py",
        [
            f"ckpt={sr_ckpt}",
            f"base_ckpt={text_ckpt}",
            "num_samples=2",
            f"outdir={tmp_path / 'b'}",
            *scored,
        ],
    )
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["source"] == "base_ckpt" and metrics["num_images"] == 2
    res = run_app(
        "src/diffusionlab/cli/upsample.py",
        [
            f"ckpt={sr_ckpt}",
            "evaluate=true",
            "num_samples=4",
            f"outdir={tmp_path / 'c'}",
            *scored,
        ],
    )
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    for name in ("model", "bicubic"):
        assert {"psnr", "consistency", "fid", "kid_mean"} <= set(metrics[name])
    assert metrics["bicubic"]["psnr"] > 10
    assert (tmp_path / "c" / "comparison.png").is_file()


def test_wrong_condition_for_a_checkpoint_is_one_message(text_ckpt, sr_ckpt, tmp_path):
    cases = [
        ("sample.py", [f"ckpt={sr_ckpt}", "prompt=a seven"], "needs a text-conditioned ckpt"),
        ("sample.py", [f"ckpt={sr_ckpt}"], "is image-conditioned: dl-upsample"),
        (
            "sample.py",
            [f"ckpt={text_ckpt}", "negative_prompt=a one"],
            "negative_prompt=... acts through guidance",
        ),
        (
            "src/diffusionlab/cli/upsample.py",
            [f"ckpt={text_ckpt}", f"inputs={tmp_path}"],
            "upsampling needs an image-conditioned (super-resolution) checkpoint",
        ),
        (
            "src/diffusionlab/cli/upsample.py",
            [f"ckpt={sr_ckpt}", f"inputs={tmp_path}", "evaluate=true"],
            "give exactly one source",
        ),
    ]
    for script, args, message in cases:
        res = run_app(script, [*args, "sampler.nfe=3", f"outdir={tmp_path / 'o'}"])
        assert res.returncode == 1, (args, res.stderr[-1500:])
        assert message in res.stderr, (args, res.stderr[-1500:])
        assert "Traceback" not in res.stderr
    # resuming a text-conditioned run without its cond
    common = [*fast_overrides(tmp_path, callbacks=False), *TEXT[:2], "data.batch_size=8"]
    res = run_app("train.py", [*common, "cond=none", f"resume_ckpt={text_ckpt}"])
    assert res.returncode == 1, res.stderr[-1500:]
    assert "resume_ckpt=" in res.stderr and "different model config" in res.stderr
    assert "cond.kind: 'text' -> None" in res.stderr


def test_consistency_models_take_text_and_image_conditions(text_ckpt, sr_ckpt, tmp_path):
    """iCT from scratch on captions samples a prompt in one step; ECT tunes the super-resolution
    model; distillation refuses a trainable text encoder and a teacher of another condition."""
    consistency = ["parameterization=consistency", "sampler=consistency"]
    ckpt = _train(tmp_path / "ict", [*TEXT, "data.batch_size=8", *consistency, "loss=ict"])
    module = load_module(str(ckpt), "cpu")
    assert module.cond.kind == "text" and type(module.loss_fn).__name__ == "ICTLoss"
    out = tmp_path / "one_step"
    args = [f"ckpt={ckpt}", "num_samples=2", "sampler.nfe=1", f"outdir={out}", "npz=true"]
    res = run_app("sample.py", [*args, "prompt=a handwritten seven", "guidance=2"])
    assert res.returncode == 0, res.stderr[-2000:]
    data = np.load(out / "samples.npz")
    assert data["samples"].shape == (2, 16, 16, 1)
    assert list(data["prompts"]) == ["a handwritten seven"] * 2
    sr = ["experiment=sr_mnist", "dataset=mnist", "data.batch_size=4", "model.model_channels=8"]
    tuned = _train(tmp_path / "ect", [*sr, *consistency, "loss=ect", f"init_ckpt={sr_ckpt}"])
    hp = torch.load(tuned, weights_only=True)["hyper_parameters"]
    assert hp["loss"]["_target_"].endswith("ECTLoss") and hp["cond"]["kind"] == "image"
    distill = [*fast_overrides(tmp_path / "cd"), "trainer.max_steps=2", *consistency, "loss=cd"]
    with pytest.raises(ConfigError, match="loss=cd with cond=text needs a frozen text encoder"):
        train(compose_train([*distill, *TEXT, f"init_ckpt={text_ckpt}"], tmp_path / "cd"))
    other = [*distill, *TEXT[:2], "cond=none", f"loss.teacher_ckpt={text_ckpt}"]
    with pytest.raises(ConfigError, match="is conditioned on cond=text; this run on cond=none"):
        train(compose_train(other, tmp_path / "cd2"))


def test_meanflow_takes_text_and_image_conditions(sr_ckpt, tmp_path):
    """MeanFlow on captions samples a prompt with classifier-free guidance in two flow-map steps
    (the end of each step reaches both halves of the guided batch); tuning the super-resolution
    model into a flow map widens its vector map (the augmentation level's features, then the
    second time's) and starts from its weights."""
    mean_flow = ["parameterization=flow_map", "loss=meanflow", "sampler=flow_map"]
    ckpt = _train(tmp_path / "mf", [*TEXT, "data.batch_size=8", *mean_flow])
    out = tmp_path / "two_steps"
    args = [f"ckpt={ckpt}", "num_samples=2", "sampler.nfe=2", f"outdir={out}", "npz=true"]
    res = run_app("sample.py", [*args, "prompt=a handwritten seven", "guidance=2"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert np.isfinite(np.load(out / "samples.npz")["samples"]).all()
    sr = ["experiment=sr_mnist", "dataset=mnist", "data.batch_size=4", "model.model_channels=8"]
    tuned = _train(tmp_path / "sr", [*sr, *mean_flow, f"init_ckpt={sr_ckpt}"])
    state = torch.load(tuned, weights_only=True)["state_dict"]
    start = torch.load(sr_ckpt, weights_only=True)["state_dict"]
    wide, old = state["denoiser.net.map_vector.weight"], start["denoiser.net.map_vector.weight"]
    assert wide.shape[1] == old.shape[1] + FlowMapParam.end_features
    assert (wide[:, : old.shape[1]] - old).abs().max() < 0.05 < old.abs().max()


def test_training_errors_name_the_key_or_file(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / f"{i}.png")
    (folder / "0.txt").write_text("a black square\n")
    common = [*fast_overrides(tmp_path, callbacks=False), "trainer.max_steps=1"]
    cases = [
        (
            [
                *TEXT,
                "dataset=image_folder",
                f"dataset.path={folder}",
                "dataset.resolution=8",
                "dataset.channels=1",
                "dataset.captions=true",
                "cond.cross_attn_resolutions=[4]",
            ],
            "1.png' has no caption file",
        ),
        (["cond=text", "cond.cross_attn_resolutions=[4]"], "cond=text needs captions but dataset"),
        (
            [*TEXT, "cond.encoder.kind=clip", f"cond.encoder.path={tmp_path / 'none'}"],
            "cond.encoder.path=",
        ),
        ([*TEXT, "cond.cross_attn_resolutions=[64]"], "cond.cross_attn_resolutions=[64] match no"),
        (["cond=image", "cond.factor=3"], "cond.factor=3 must divide the data resolution 8"),
    ]
    for args, message in cases:
        res = run_app("train.py", [*common, *args])
        assert res.returncode == 1, (args, res.stderr[-1500:])
        assert message in res.stderr, (args, res.stderr[-1500:])


def test_cond_class_is_the_label_path_with_its_dropout(tmp_path):
    from diffusionlab.cli.train import build

    cfg = compose_train([*fast_overrides(tmp_path), "cond=class", "cond.dropout=0.2"], tmp_path)
    assert cfg.label_dim == 10 and cfg.model.label_dropout == 0.2
    module, _ = build(cfg)
    assert module.label_dim == 10 and module.cond is None
    assert module.denoiser.net.label_dropout == 0.2
