"""End-to-end runs of ``train.py`` (Hydra compose API in-process, and real subprocesses)."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffusionlab.cli.train import build, train
from diffusionlab.config import CONF_DIR
from diffusionlab.errors import ConfigError
from diffusionlab.sampling.generator import generate
from diffusionlab.training.module import DiffusionModule

from .helpers import compose_train, fast_overrides, run_app


def _group(name: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / name).glob("*.yaml"))


SCHEDULES = _group("schedule")
PARAMETERIZATIONS = _group("parameterization")
SAMPLERS = [s for s in _group("sampler") if s != "inherit"]  # inherit: a use site's base
# loss=ect and loss=cd start from a trained checkpoint: tests/app/test_consistency_app.py
LOSSES = [n for n in _group("loss") if n not in ("ect", "cd")]


def test_default_config_is_the_cpu_mnist_run():
    cfg = compose_train([], Path("/tmp/unused"))
    assert cfg.dataset._target_ == "diffusionlab.data.mnist" and cfg.dataset.resolution == 16
    assert cfg.model.img_resolution == 16 and cfg.model.in_channels == 1
    assert (
        cfg.trainer.max_steps > 0 and cfg.wandb.mode == "auto" and cfg.logger.wandb.mode == "auto"
    )
    assert set(cfg.logger) == {"csv", "wandb"}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_every_schedule_and_parameterization_trains(tmp_path, schedule, parameterization):
    overrides = [*fast_overrides(tmp_path, callbacks=False), "trainer.max_steps=2"]
    overrides += [f"schedule={schedule}", f"parameterization={parameterization}"]
    metrics = train(compose_train(overrides, tmp_path))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_trains(tmp_path, loss):
    overrides = [*fast_overrides(tmp_path, callbacks=False), f"loss={loss}", "trainer.max_steps=2"]
    if loss == "hybrid":  # iDDPM's loss trains a learned variance on a discrete schedule
        overrides += [
            "schedule=cosine",
            "parameterization=eps",
            "parameterization.learned_variance=true",
            "model.out_channels=2",
        ]
    elif loss == "meanflow":  # trains a flow map
        overrides.append("parameterization=flow_map")
    metrics = train(compose_train(overrides, tmp_path))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_sampler_composes_with_every_schedule(tmp_path, schedule):
    """All samplers run on an untrained model for each schedule and give finite images."""
    module, _ = build(compose_train([*fast_overrides(tmp_path), f"schedule={schedule}"], tmp_path))
    for sampler in SAMPLERS:
        sampler_cfg = OmegaConf.to_container(
            OmegaConf.load(Path(CONF_DIR) / "sampler" / f"{sampler}.yaml")
        )
        if sampler == "rk45":
            sampler_cfg["options"] = {**sampler_cfg["options"], "rtol": 1e-2, "atol": 1e-2}
        elif sampler == "annealed_langevin":  # 2 levels x 2 steps + the final denoising step
            sampler_cfg["options"] = {**sampler_cfg["options"], "steps_per_level": 2}
            sampler_cfg["nfe"] = 5
        else:
            sampler_cfg["nfe"] = 4
        if sampler == "consistency":  # samples consistency models only (parameterization=edm)
            with pytest.raises(ConfigError, match="sampler=consistency"):
                generate(module, range(2), sampler=sampler_cfg)
            continue
        x = generate(module, range(2), sampler=sampler_cfg)
        assert x.shape == (2, 1, 8, 8), sampler
        assert torch.isfinite(x).all(), f"{sampler} x {schedule} gave non-finite samples"


def test_run_writes_checkpoints_samples_metrics_and_resumes(tmp_path):
    overrides = fast_overrides(tmp_path) + ["callbacks.model_checkpoint.every_n_train_steps=2"]
    train(compose_train(overrides, tmp_path / "a"))
    run = tmp_path / "a"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "checkpoints" / "step_000002.ckpt").is_file()
    assert (run / "samples" / "step_000003.png").is_file()
    assert (run / "metrics.csv").read_text().startswith("epoch") or "train/loss" in (
        run / "metrics.csv"
    ).read_text()

    module = DiffusionModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert module.data_shape == (1, 8, 8)
    x = generate(module, range(3), sampler={"name": "euler", "nfe": 3})
    assert x.shape == (3, 1, 8, 8)

    resumed = compose_train(
        [
            *fast_overrides(tmp_path),
            "trainer.max_steps=5",
            f"resume_ckpt={run / 'checkpoints' / 'last.ckpt'}",
        ],
        tmp_path / "b",
    )
    train(resumed)
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 5


def test_samples_do_not_depend_on_batch_size(tmp_path):
    module, _ = build(compose_train(fast_overrides(tmp_path), tmp_path))
    sampler = {"name": "euler", "nfe": 4}
    all_at_once = generate(module, range(6), sampler=sampler)
    split = torch.cat(
        [
            generate(module, range(0, 2), sampler=sampler),
            generate(module, range(2, 6), sampler=sampler),
        ]
    )
    torch.testing.assert_close(all_at_once, split)


def test_class_conditional_training(tmp_path):
    overrides = [*fast_overrides(tmp_path, callbacks=False), "label_dim=10"]
    train(compose_train(overrides, tmp_path))
    cfg = compose_train(overrides, tmp_path)
    module, _ = build(cfg)
    labels = module.one_hot(torch.arange(4) % 10)
    assert generate(
        module, range(4), class_labels=labels, sampler={"name": "euler", "nfe": 2}
    ).shape == (4, 1, 8, 8)


@pytest.mark.parametrize(
    "model", ["unet_tiny", "unet_ncsnpp_tiny", "unet_adm_tiny", "dit_tiny", "unet_edm2_tiny"]
)
def test_every_tiny_network_trains_class_conditional(tmp_path, model):
    overrides = [*fast_overrides(tmp_path, callbacks=False), f"model={model}", "label_dim=10"]
    train(compose_train(overrides, tmp_path))
    metrics = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(metrics) > 1 and "train/loss" in metrics[0]


def test_toy2d_with_mlp(tmp_path):
    overrides = [*fast_overrides(tmp_path), "dataset=toy2d", "model=mlp", "data.batch_size=128"]
    train(compose_train(overrides, tmp_path))
    assert (tmp_path / "samples" / "step_000003.png").is_file()


def test_train_py_subprocess_writes_run_dir(tmp_path):
    res = run_app("train.py", fast_overrides(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list((tmp_path / "train" / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    for item in [
        ".hydra/config.yaml",
        "checkpoints/last.ckpt",
        "samples/step_000003.png",
        "metrics.csv",
    ]:
        assert (run / item).exists(), item
    saved = (run / ".hydra" / "config.yaml").read_text()
    assert "digits" in saved
    # A clean console: no library warning a user cannot act on (Lightning's eval-mode note on the
    # EMA copy, its pytree deprecation under newer torch).
    assert "Warning" not in res.stderr and "deprecated" not in res.stderr, res.stderr[-3000:]


def test_multirun_grid_writes_four_jobs(tmp_path):
    args = ["-m", "schedule=vp,edm", "parameterization=eps,v", *fast_overrides(tmp_path)]
    res = run_app("train.py", args)
    assert res.returncode == 0, res.stderr[-3000:]
    (sweep,) = list((tmp_path / "train" / "multiruns").iterdir())
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2", "3"]
    combos = set()
    for j in jobs:
        cfg = OmegaConf.load(sweep / j / ".hydra" / "config.yaml")
        assert (sweep / j / "checkpoints" / "last.ckpt").is_file()
        combos.add((cfg.schedule._target_, cfg.parameterization._target_))
    assert len(combos) == 4


def test_experiment_preset_overrides_several_groups(tmp_path):
    base = compose_train([], tmp_path)
    cfg = compose_train(["experiment=flow_mnist"], tmp_path)
    assert cfg.schedule._target_ != base.schedule._target_
    assert cfg.parameterization._target_ != base.parameterization._target_
    assert cfg.sampler.name != base.sampler.name


@pytest.mark.parametrize(
    "args, message",
    [
        (["schedule=nope"], "schedule"),
        (["dataset=image_folder", "dataset.path=/no/such/folder"], "dataset.path"),
        (["dataset=mnist", "dataset.resolution=18"], "resolution"),
        (["label_dim=7"], "label_dim=7"),
    ],
)
def test_user_errors_stop_before_training(tmp_path, args, message):
    res = run_app("train.py", [*fast_overrides(tmp_path), *args])
    assert res.returncode != 0
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert not list(tmp_path.rglob("*.ckpt"))
