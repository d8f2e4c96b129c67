"""Consistency models through the real training app: the presets (experiment=ect_mnist from a
diffusion checkpoint, ict_mnist from scratch) and distillation (loss=cd) train a few steps on the
CPU; the CIFAR-10 presets carry the papers' settings; errors a user can cause name their key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffusionlab.cli.train import train
from diffusionlab.errors import ConfigError
from diffusionlab.sampling.checkpoint import load_module

from .helpers import compose_train, fast_overrides

# digits (8x8) instead of the presets' mnist16, the tiny network, two steps
TINY = [o for o in fast_overrides(Path("/unused")) if not o.startswith("paths.")]


def tiny(tmp_path: Path, *extra: str) -> list[str]:
    return [*TINY, "trainer.max_steps=2", "sampler.nfe=2", f"paths.log_dir={tmp_path}", *extra]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A two-step EDM checkpoint of the default run's shape family (digits, unet_tiny)."""
    out = tmp_path_factory.mktemp("teacher")
    train(compose_train(tiny(out), out))
    return out / "checkpoints" / "last.ckpt"


def test_ect_preset_tunes_a_diffusion_checkpoint(tmp_path, teacher):
    cfg = compose_train(["experiment=ect_mnist", f"init_ckpt={teacher}", *tiny(tmp_path)], tmp_path)
    assert cfg.loss.gap.double_every == 562 and cfg.lr_warmup_steps == 0
    assert cfg.loss.weighting == "inv_gap" and cfg.trainer.max_steps == 2
    train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert ckpt["global_step"] == 2
    assert hp["loss"]["_target_"].endswith("consistency.ECTLoss")
    assert hp["parameterization"]["_target_"].endswith("ConsistencyParam")
    # the student started from the teacher: after two small steps its F is still close
    student, start = (
        load_module(str(tmp_path / "checkpoints" / "last.ckpt"), "cpu"),
        load_module(str(teacher), "cpu"),
    )
    a = torch.cat([p.flatten() for p in student.denoiser.net.parameters()])
    b = torch.cat([p.flatten() for p in start.denoiser.net.parameters()])
    assert (a - b).abs().max() < 0.01 < b.abs().max()
    # the boundary holds for the trained model; one-step samples are finite
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(student.ema(x, 0.002), x)


def test_consistency_sampler_refuses_a_diffusion_checkpoint(teacher):
    from diffusionlab.sampling.generator import DiffusionGenerator

    module = load_module(str(teacher), "cpu")
    with pytest.raises(ConfigError, match="sampler=consistency samples consistency models"):
        DiffusionGenerator.from_module(module, {"name": "consistency", "nfe": 1})


def test_ect_preset_without_init_ckpt_names_the_key(tmp_path):
    cfg = compose_train(["experiment=ect_mnist", *tiny(tmp_path)], tmp_path)
    with pytest.raises(ConfigError, match="init_ckpt: a value is required"):
        train(cfg)


def test_ict_preset_trains_from_scratch_with_its_curriculum(tmp_path):
    cfg = compose_train(["experiment=ict_mnist", *tiny(tmp_path)], tmp_path)
    assert cfg.loss.total_steps == 2 and cfg.loss.s0 == 10 and cfg.loss.s1 == 1280
    train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert ckpt["hyper_parameters"]["loss"]["_target_"].endswith("consistency.ICTLoss")


def test_distillation_reads_its_teacher(tmp_path, teacher):
    args = ["parameterization=consistency", "loss=cd", "sampler=consistency"]
    train(compose_train([*args, f"init_ckpt={teacher}", *tiny(tmp_path / "a")], tmp_path / "a"))
    ckpt = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    # a teacher apart from the student's start
    train(
        compose_train(
            [*args, f"loss.teacher_ckpt={teacher}", *tiny(tmp_path / "b")], tmp_path / "b"
        )
    )
    with pytest.raises(ConfigError, match="loss.teacher_ckpt"):
        train(compose_train([*args, *tiny(tmp_path / "c")], tmp_path / "c"))


def test_scm_preset_tunes_through_the_jvp(tmp_path, teacher):
    """experiment=scm_mnist: sCT from the default run's checkpoint; the learned adaptive
    weighting is saved and trained with the network; sCD (loss.tangent=teacher) reads the
    init_ckpt as its teacher and stops without one; the consistency coefficients with sigma_min
    0.002 are refused with the key to set."""
    cfg = compose_train(
        ["experiment=scm_mnist", f"init_ckpt={teacher}", *tiny(tmp_path / "a")], tmp_path / "a"
    )
    assert cfg.loss.tangent == "data" and cfg.parameterization.sigma_min == 0.0
    train(cfg)
    ckpt = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert ckpt["hyper_parameters"]["loss"]["_target_"].endswith("SCMLoss")
    weight = ckpt["state_dict"]["loss_fn.adaptive.linear.weight"]
    assert weight.abs().max() > 0  # zero-initialised, moved by two optimizer steps
    student = load_module(str(tmp_path / "a" / "checkpoints" / "last.ckpt"), "cpu")
    x = torch.randn(3, 1, 8, 8)
    assert torch.isfinite(student.ema(x, 80.0)).all()
    scd = ["experiment=scm_mnist", "loss.tangent=teacher", *tiny(tmp_path / "b")]
    train(compose_train([*scd, f"init_ckpt={teacher}"], tmp_path / "b"))
    with pytest.raises(ConfigError, match="loss=scm needs a teacher"):
        train(compose_train(scd, tmp_path / "b"))
    bad = ["experiment=scm_mnist", "parameterization.sigma_min=0.002", *tiny(tmp_path / "c")]
    with pytest.raises(ConfigError, match="parameterization.sigma_min=0"):
        train(compose_train(bad, tmp_path / "c"))


def test_meanflow_preset_starts_from_its_teacher(tmp_path, teacher):
    """experiment=meanflow_mnist: the flow map built on the teacher's network, its second-time
    input added at zero weight, so before any step D(x; sigma, s) is the teacher's D(x; sigma)
    for every end s; two MeanFlow steps train it and sampler=flow_map draws finite images at one
    and two NFE; from scratch it needs no checkpoint; distillation (loss.velocity=teacher) reads
    init_ckpt as its teacher and stops without one; loss=meanflow refuses a one-time model."""
    from diffusionlab.interop.module import init_weights
    from diffusionlab.sampling.generator import DiffusionGenerator
    from diffusionlab.training.module import DiffusionModule

    cfg = compose_train(
        ["experiment=meanflow_mnist", f"init_ckpt={teacher}", *tiny(tmp_path / "a")],
        tmp_path / "a",
    )
    assert (cfg.loss.p_mean, cfg.loss.p_std, cfg.loss.ratio, cfg.loss.power) == (
        -1.0,
        2.0,
        0.75,
        0.75,
    )
    assert cfg.sampler.name == "flow_map"
    start = load_module(str(teacher), "cpu")
    hp = {**start.hparams, "parameterization": OmegaConf.to_container(cfg.parameterization)}
    hp["loss"] = OmegaConf.to_container(cfg.loss)
    module = DiffusionModule(**hp).eval()
    init_weights(module, str(teacher))
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([80.0, 2.0, 0.1])
    with torch.no_grad():
        d = start.ema(x, sigma)
        for end in (sigma, torch.zeros(3), sigma / 3):
            assert torch.equal(module.ema(x, sigma, sigma_end=end), d)
    train(cfg)
    ckpt = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert ckpt["hyper_parameters"]["loss"]["_target_"].endswith("MeanFlowLoss")
    assert ckpt["state_dict"]["denoiser.net.map_vector.weight"].abs().max() > 0  # trained
    student = load_module(str(tmp_path / "a" / "checkpoints" / "last.ckpt"), "cpu")
    for nfe in (1, 2):
        gen = DiffusionGenerator.from_module(student, {"name": "flow_map", "nfe": nfe})
        assert torch.isfinite(gen.generate([0, 1])).all()
    train(compose_train(["experiment=meanflow_mnist", *tiny(tmp_path / "b")], tmp_path / "b"))
    distil = ["experiment=meanflow_mnist", "loss.velocity=teacher", *tiny(tmp_path / "d")]
    train(compose_train([*distil, f"init_ckpt={teacher}"], tmp_path / "d"))
    with pytest.raises(ConfigError, match="loss=meanflow needs a teacher"):
        train(compose_train(distil, tmp_path / "d"))
    bad = ["experiment=meanflow_mnist", "parameterization=edm", *tiny(tmp_path / "c")]
    with pytest.raises(ConfigError, match="parameterization=flow_map"):
        train(compose_train(bad, tmp_path / "c"))


# the papers' settings (a typo in a preset fails here)
PAPER = {
    "ect_cifar10": {  # Geng et al. 2024; locuslab/ect run_ecm.sh, ct_train.py, ECMLoss
        "loss._target_": "diffusionlab.diffusion.consistency.ECTLoss",
        "loss.p_mean": -1.1,
        "loss.p_std": 2.0,
        "loss.huber_c": 0.0,
        "loss.weighting": "inv_gap",  # ECMLoss: loss / (t - r)
        "loss.gap.q": 2.0,
        "loss.gap.k": 8.0,
        "loss.gap.b": 1.0,
        "loss.gap.mapping": "sigmoid",
        "loss.gap.double_every": 25_000,  # --double=250 ticks x 12.8 kimg / 128
        "parameterization.sigma_data": 0.5,
        "parameterization.train_coefficients": "edm",  # ECMPrecond in training mode
        "model.model_channels": 128,
        "model.channel_mult": [2, 2, 2],
        "model.embedding_type": "positional",
        "model.dropout": 0.2,
        "optimizer._target_": "torch.optim.RAdam",
        "optimizer.lr": 1e-4,
        "data.batch_size": 128,
        "trainer.max_steps": 200_000,  # --duration=25.6 Mimg / 128
        "ema.decay": 0.9999,
        "sampler.name": "consistency",
        "sampler.sigmas": [80.0, 0.821],  # --mid_t=0.821
    },
    "ict_cifar10": {  # Song & Dhariwal 2023, sec. 3-5
        "loss._target_": "diffusionlab.diffusion.consistency.ICTLoss",
        "loss.s0": 10,
        "loss.s1": 1280,
        "loss.total_steps": 400_000,
        "loss.p_mean": -1.1,
        "loss.p_std": 2.0,
        "loss.huber_c": None,  # 0.00054 sqrt(3072) = 0.03
        "model.embedding_type": "fourier",
        "model.dropout": 0.3,
        "optimizer.lr": 1e-4,
        "data.batch_size": 1024,
        "trainer.max_steps": 400_000,
        "ema.decay": 0.99993,
        "sampler.name": "consistency",
    },
}


@pytest.mark.parametrize("preset", sorted(PAPER))
def test_cifar10_presets_have_the_papers_settings(tmp_path, preset):
    cfg = compose_train([f"experiment={preset}", "init_ckpt=x"], tmp_path)
    got = {k: OmegaConf.select(cfg, k) for k in PAPER[preset]}
    got = {k: list(v) if OmegaConf.is_list(v) else v for k, v in got.items()}
    assert got == PAPER[preset]
