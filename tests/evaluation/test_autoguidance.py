"""Autoguidance and class grids: the guided denoiser's formula on analytic class Gaussians,
guide_ckpt checks, and sample.py's class_grid on tiny checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from app.helpers import compose_train, fast_overrides
from diffusionlab.cli.sample import sample
from diffusionlab.cli.train import train
from diffusionlab.config import CONF_DIR
from diffusionlab.diffusion.schedules import get_schedule
from diffusionlab.errors import ConfigError
from diffusionlab.sampling.conditioning import ClassLabels
from diffusionlab.sampling.generator import DiffusionGenerator
from diffusionlab.sampling.spec import SamplerSpec

from .conftest import RESOLUTION, ClassGaussians


def _generator(denoise, guide=None, guidance=1.0, interval=None) -> DiffusionGenerator:
    return DiffusionGenerator(
        denoise,
        get_schedule("edm"),
        (1, RESOLUTION, RESOLUTION),
        condition=ClassLabels(10),
        spec=SamplerSpec(name="heun", nfe=5),
        guidance=guidance,
        guide=guide,
        guidance_interval=interval,
    )


def _guided_denoise(gen: DiffusionGenerator, labels: torch.Tensor, monkeypatch):
    """The denoise function ``gen`` hands its sampler for ``labels``."""
    seen = {}

    def spy(spec, denoise, schedule, noise, **kwargs):
        seen["denoise"] = denoise
        return noise

    monkeypatch.setattr(SamplerSpec, "sample", spy)
    gen.sample_images(torch.zeros(len(labels), 1, RESOLUTION, RESOLUTION), labels)
    return seen["denoise"]


def test_autoguided_denoiser_is_guide_plus_w_times_the_difference(
    class_gaussians, mnist, monkeypatch
):
    """D = D_guide + w (D_main - D_guide) (Karras et al. 2024 eq. 1), both given the same
    labels; the guide here is a weaker model of the same data (diagonal covariances)."""
    guide = ClassGaussians(mnist.images, mnist.labels, 10, diagonal=True)
    labels = torch.tensor([0, 3, 7, 9])
    one_hot = torch.nn.functional.one_hot(labels, 10).float()
    x = torch.randn(4, 1, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor(1.5)
    d_main, d_guide = class_gaussians(x, sigma, one_hot), guide(x, sigma, one_hot)
    assert (d_main - d_guide).abs().max() > 0.05  # the guide differs, so w matters
    for w in (1.0, 2.0, 4.0):
        denoise = _guided_denoise(_generator(class_gaussians, guide, w), labels, monkeypatch)
        torch.testing.assert_close(denoise(x, sigma), d_guide + w * (d_main - d_guide))


def test_a_model_guiding_itself_is_the_model(class_gaussians):
    labels = torch.arange(10) % 10
    noise = torch.randn(10, 1, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(1))
    plain = _generator(class_gaussians).sample_images(noise, labels)
    guided = _generator(class_gaussians, class_gaussians, 4.0).sample_images(noise, labels)
    torch.testing.assert_close(guided, plain)


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory) -> dict[str, str]:
    """last.ckpt of 3-step digits runs: class-conditional (label_dim 10) and unconditional."""
    out = {}
    for name, extra in (("cond", ["label_dim=10"]), ("uncond", [])):
        tmp = tmp_path_factory.mktemp(name)
        train(compose_train([*fast_overrides(tmp), *extra], tmp / "run"))
        out[name] = str(next((tmp / "run").rglob("last.ckpt")))
    return out


def _sample_cfg(tmp_path, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            "sample",
            [
                "sampler=euler",
                "sampler.nfe=2",
                "png=false",
                "wandb.mode=disabled",
                f"outdir={tmp_path}",
                f"paths.output_dir={tmp_path}",
                *overrides,
            ],
        )


def test_class_grid_has_one_row_per_class(tiny_ckpts, tmp_path):
    cfg = _sample_cfg(
        tmp_path, [f"ckpt={tiny_ckpts['cond']}", "class_grid=true", "num_samples=20", "npz=true"]
    )
    sample(cfg)
    labels = np.load(tmp_path / "samples.npz")["labels"]
    assert labels.tolist() == [k for k in range(10) for _ in range(2)]
    with Image.open(tmp_path / "grid.png") as grid:  # 10 rows x 2 columns of 8x8, 1-pixel gaps
        assert grid.size == (2 * 9 + 1, 10 * 9 + 1)


@pytest.mark.parametrize(
    ("ckpt", "overrides", "message"),
    [
        (
            "cond",
            ["class_grid=true", "num_samples=15"],
            "num_samples=15 images must be a multiple of label_dim=10",
        ),
        ("cond", ["class_grid=true", "num_samples=20", "class_label=3"], "leave class_label=null"),
        ("uncond", ["class_grid=true"], "class_grid=true needs a class-conditional"),
        # an unconditional guide of a conditional model is EDM2's guidance; the reverse is refused
        ("uncond", ["guide_ckpt=cond"], "has label_dim=10 but ckpt has 0"),
        ("uncond", ["guidance=2"], "or a guide_ckpt"),
        ("cond", ["guidance=2", "guidance_interval=[5,1]"], "guidance_interval=.*sigma_lo <"),
    ],
)
def test_sample_refuses_bad_grids_and_guides(tiny_ckpts, tmp_path, ckpt, overrides, message):
    overrides = [o.replace("=uncond", f"={tiny_ckpts['uncond']}") for o in overrides]
    overrides = [o.replace("=cond", f"={tiny_ckpts['cond']}") for o in overrides]
    cfg = _sample_cfg(tmp_path, [f"ckpt={tiny_ckpts[ckpt]}", *overrides])
    with pytest.raises(ConfigError, match=message):
        sample(cfg)


def test_unconditional_autoguidance_samples(tiny_ckpts, tmp_path):
    """Autoguidance needs no labels: an unconditional model guided by (here) itself at w=3 gives
    the unguided images."""
    ckpt = tiny_ckpts["uncond"]
    plain = sample(_sample_cfg(tmp_path / "plain", [f"ckpt={ckpt}", "num_samples=4", "npz=true"]))
    guided = sample(
        _sample_cfg(
            tmp_path / "guided",
            [f"ckpt={ckpt}", f"guide_ckpt={ckpt}", "guidance=3", "num_samples=4", "npz=true"],
        )
    )
    a = np.load(plain / "samples.npz")["samples"].astype(int)
    b = np.load(guided / "samples.npz")["samples"].astype(int)
    assert np.abs(a - b).max() <= 1  # D_g + 3 (D - D_g) = D up to float rounding


def test_evaluate_takes_a_guide_for_a_single_ckpt_only(tmp_path):
    from diffusionlab.cli.evaluate import evaluate

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "evaluate",
            ["ckpt=[a.ckpt,b.ckpt]", "guide_ckpt=g.ckpt", f"paths.output_dir={tmp_path}"],
        )
    with pytest.raises(ConfigError, match="guide_ckpt need a single ckpt"):
        evaluate(cfg)


def test_evaluate_recognition_with_a_guide(tiny_ckpts, tmp_path):
    """evaluate.py end to end with guide_ckpt and eval.recognition: a checkpoint guiding itself
    at w=3 scores exactly like the unguided checkpoint, and the metrics name the guide."""
    from diffusionlab.cli.evaluate import evaluate

    ckpt = tiny_ckpts["cond"]
    results = []
    for extra in ([], [f"guide_ckpt={ckpt}", "guidance=3"]):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(
                "evaluate",
                [
                    f"ckpt={ckpt}",
                    "dataset=digits",
                    "eval.recognition=true",
                    "eval.metrics=[]",
                    "eval.num_samples=40",
                    "eval.extractor_steps=50",
                    f"eval.cache_dir={tmp_path / 'cache'}",
                    "sampler=euler",
                    "sampler.nfe=3",
                    "wandb.mode=disabled",
                    f"paths.output_dir={tmp_path / str(len(results))}",
                    *extra,
                ],
            )
        results.append(evaluate(cfg))
    plain, guided = results
    assert guided["guide_ckpt"] == ckpt and "guide_ckpt" not in plain
    assert set(plain["metrics"]) == {
        "recognition",
        "recognition_real",
        "recognition_ratio",
        "classes_present",
        "class_accuracy",
    }
    for key, value in plain["metrics"].items():
        assert guided["metrics"][key] == pytest.approx(value, abs=0.03), key


def test_guidance_interval_in_the_generator(class_gaussians, mnist):
    """CFG and autoguidance through DiffusionGenerator: an interval holding every sigma of the
    grid is full guidance, one above sigma_max the unguided model, a middle one neither."""
    guide = ClassGaussians(mnist.images, mnist.labels, 10, diagonal=True)
    labels = torch.arange(6)
    noise = torch.randn(6, 1, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(2))
    plain = _generator(class_gaussians).sample_images(noise, labels)
    for g in (None, guide):  # CFG (the empty label), autoguidance
        full = _generator(class_gaussians, g, 3.0).sample_images(noise, labels)
        assert (full - plain).abs().max() > 0.05
        every = _generator(class_gaussians, g, 3.0, [0, float("inf")])
        torch.testing.assert_close(every.sample_images(noise, labels), full)
        none = _generator(class_gaussians, g, 3.0, [100, 200])
        torch.testing.assert_close(none.sample_images(noise, labels), plain)
        middle = _generator(class_gaussians, g, 3.0, [0.5, 5]).sample_images(noise, labels)
        assert (middle - full).abs().max() > 1e-3 and (middle - plain).abs().max() > 1e-3


def test_sample_app_guidance_interval(tiny_ckpts, tmp_path, monkeypatch):
    """sample.py guidance_interval=... reaches the generator's denoiser: above sigma_max the
    images are the unguided ones (a 3-step model hardly reads its labels, so the guided
    denoiser is checked on the generator itself)."""
    ckpt = tiny_ckpts["cond"]
    base = [f"ckpt={ckpt}", "num_samples=4", "npz=true", "sampler=heun", "sampler.nfe=5"]
    seen = []
    from_module = DiffusionGenerator.from_module.__func__

    def spy(cls, *args, **kwargs):
        gen = from_module(cls, *args, **kwargs)
        seen.append(gen.guidance_interval)
        return gen

    monkeypatch.setattr(DiffusionGenerator, "from_module", classmethod(spy))
    out = {}
    for name, extra in (
        ("plain", []),
        ("above", ["guidance=4", "guidance_interval=[100,200]"]),
        ("middle", ["guidance=4", "guidance_interval=[0.28,5.42]"]),
    ):
        folder = sample(_sample_cfg(tmp_path / name, [*base, *extra]))
        out[name] = np.load(folder / "samples.npz")["samples"].astype(int)
    assert seen == [None, (100.0, 200.0), (0.28, 5.42)]
    assert np.array_equal(out["above"], out["plain"])


def test_evaluate_guidance_sweep_with_repeats_and_protocol(tiny_ckpts, tmp_path):
    """evaluate.py guidance_sweep.weights x guidance_sweep.intervals with eval.repeats=2: one row per
    point with FID (min / mean / std / max over the blocks), class accuracy and its protocol;
    weight 1 is the same images with or without an interval; metrics.json's protocol reads
    back."""
    import csv
    import json

    from diffusionlab.cli.evaluate import evaluate
    from diffusionlab.evaluation.protocol import Protocol

    ckpt = tiny_ckpts["cond"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "evaluate",
            [
                f"ckpt={ckpt}",
                "dataset=digits",
                "eval.recognition=true",
                "eval.metrics=[fid]",
                "eval.num_samples=30",
                "eval.repeats=2",
                "eval.extractor_steps=30",
                f"eval.cache_dir={tmp_path / 'cache'}",
                "sampler=euler",
                "sampler.nfe=3",
                "guidance_sweep.weights=[1,3]",
                "guidance_sweep.intervals=[null,[0.5,5]]",
                "wandb.mode=disabled",
                f"paths.output_dir={tmp_path / 'out'}",
            ],
        )
    result = evaluate(cfg)
    rows = result["guidance_sweep"]
    assert [(r["guidance"], r["guidance_interval"]) for r in rows] == [
        (1.0, "all"),
        (1.0, "0.5,5"),
        (3.0, "all"),
        (3.0, "0.5,5"),
    ]
    for r in rows:
        assert r["fid_min"] <= r["fid_mean"] <= r["fid_max"] and r["fid_std"] >= 0
        assert 0 <= r["class_accuracy"] <= 1
        p = Protocol.from_row(r)
        assert p.guidance == r["guidance"] and p.repeats == 2 and p.seeds == "0-29,30-59"
        assert p.sampler == "euler" and p.nfe == 3 and p.class_sampling.startswith("uniform")
    assert rows[0]["fid"] == rows[1]["fid"]  # w = 1: the interval changes nothing
    assert Protocol.from_row(rows[3]).guidance_interval == "0.5,5"
    out = tmp_path / "out"
    assert (out / "fid_vs_guidance.png").is_file() and (out / "guidance_sweep.md").is_file()
    with open(out / "guidance_sweep.csv") as f:
        assert [Protocol.from_row(r) for r in csv.DictReader(f)] == [
            Protocol.from_row(r) for r in rows
        ]
    saved = json.loads((out / "metrics.json").read_text())
    record = Protocol.from_dict(saved["protocol"])
    assert record.ckpt == ckpt and record.num_samples == 30 and record.guidance == 1.0
    assert "fid_std" in saved["metrics"]
