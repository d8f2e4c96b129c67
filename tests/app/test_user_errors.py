"""Every error class a user can cause ends as one ``error: ...`` message naming the config key or
file (docs/errors.md keeps the table; one test per class)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from PIL import Image

from diffusionlab.cli.common import USER_ERRORS, user_message
from diffusionlab.cli.evaluate import evaluate
from diffusionlab.cli.sample import sample
from diffusionlab.cli.train import train
from diffusionlab.cli.vocabulary import prepare_args
from diffusionlab.config import CONF_DIR
from diffusionlab.data import image_folder
from diffusionlab.evaluation.protocol import parse_seeds

from .helpers import compose_train, fast_overrides, run_app


def _message(fn, *args) -> str:
    """The one-line message the apps print for the user error ``fn(*args)`` raises."""
    with pytest.raises(USER_ERRORS) as e:
        fn(*args)
    text = user_message(e.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def _train_error(tmp_path: Path, *args: str) -> str:
    return _message(lambda: train(compose_train([*fast_overrides(tmp_path), *args], tmp_path)))


def _compose(name: str, overrides: list[str], output_dir: Path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def _sample_error(tmp_path: Path, *args: str) -> str:
    overrides = ["num_samples=2", "sampler.nfe=2", *args]
    return _message(lambda: sample(_compose("sample", overrides, tmp_path)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A checkpoint of the tiny digits model after 2 steps."""
    run = tmp_path_factory.mktemp("run")
    overrides = [*fast_overrides(run), "trainer.max_steps=2"]
    train(compose_train(overrides, run))
    return run / "checkpoints" / "last.ckpt"


# ---------------------------------------------------------------- config composition (Hydra)
@pytest.mark.parametrize(
    "args, expected",
    [
        (["schedule=nope"], "Could not find 'schedule/nope' Available options in 'schedule': "),
        (["no_such_key=1"], "Could not override 'no_such_key'"),
        (["optimizer.no_such_key=1"], "Could not override 'optimizer.no_such_key'"),
        (["label_dim=[0,"], "cannot parse override 'label_dim=[0,'"),
    ],
)
def test_unknown_group_choice_or_key(tmp_path, args, expected):
    text = _message(lambda: compose_train(args, tmp_path))
    assert expected in text


def test_unknown_group_choice_ends_the_real_app_with_one_line(tmp_path):
    res = run_app("train.py", [*fast_overrides(tmp_path), "schedule=nope", "foo=1"])
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("error: In 'train': Could not find")
    assert "Traceback" not in res.stderr and "edm, flow" in res.stderr


def test_missing_mandatory_value(tmp_path):
    text = _train_error(tmp_path, "dataset=image_folder")
    assert "dataset.path: a value is required" in text


# ---------------------------------------------------------------- numbers
@pytest.mark.parametrize(
    "args, expected",
    [
        (["optimizer.lr=-0.001"], "optimizer.lr=-0.001 must be > 0"),
        (["optimizer.lr=0"], "optimizer.lr=0 must be > 0"),
        (["optimizer.lr=fast"], "optimizer.lr='fast' must be a number"),
        (["optimizer.lr=nan"], "optimizer.lr=nan must be finite"),
        (["data.batch_size=0"], "data.batch_size=0 must be >= 1"),
        (["data.batch_size=1.5"], "data.batch_size=1.5 must be an integer"),
        (["sampler.nfe=0"], "sampler.nfe=0 must be >= 1"),
        (["schedule.sigma_min=100"], "sigma_min=100: must be < sigma_max=80.0"),
        (["lr_warmup_steps=-1"], "lr_warmup_steps=-1 must be >= 0"),
        (["sampler=pc", "sampler.nfe=1"], "sampler=pc: sampler 'pc' with n_corrector=1 needs nfe"),
        (["+sampler.options.bogus=1"], "unknown options ['bogus']"),
    ],
)
def test_invalid_numbers_stop_before_training(tmp_path, args, expected):
    assert expected in _train_error(tmp_path, *args)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_invalid_numbers_in_sample_and_evaluate(tmp_path, ckpt):
    assert "num_samples=0 must be >= 1" in _sample_error(tmp_path, f"ckpt={ckpt}", "num_samples=0")
    assert "sampler.nfe=0 must be >= 1" in _sample_error(tmp_path, f"ckpt={ckpt}", "sampler.nfe=0")
    assert "batch_size=0 must be >= 1" in _sample_error(tmp_path, f"ckpt={ckpt}", "batch_size=0")
    cfg = _compose("evaluate", [f"ckpt={ckpt}", "eval.num_samples=0"], tmp_path)
    assert "eval.num_samples=0 must be >= 2" in _message(evaluate, cfg)
    cfg = _compose(
        "evaluate",
        [f"ckpt={ckpt}", "dataset=digits", "nfe_sweep.samplers=[heun]", "nfe_sweep.nfe=[0]"],
        tmp_path,
    )
    assert "nfe_sweep.samplers=heun: nfe must be >= 1" in _message(evaluate, cfg)


# ---------------------------------------------------------------- data and model
def test_toy2d_with_an_image_network(tmp_path):
    text = _train_error(tmp_path, "dataset=toy2d")
    assert "does not fit dataset=diffusionlab.data.Toy2D" in text and "model=mlp" in text


def test_image_dataset_with_the_mlp(tmp_path):
    assert "does not fit dataset=diffusionlab.data.digits" in _train_error(tmp_path, "model=mlp")


def _png(path: Path, shape: tuple[int, ...]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, 200, np.uint8)).save(path)


def test_image_folder_missing_empty_corrupt(tmp_path):
    assert "dataset.path=" in _train_error(tmp_path, "dataset=image_folder", "dataset.path=/no/x")
    (tmp_path / "empty").mkdir()
    text = _train_error(tmp_path, "dataset=image_folder", f"dataset.path={tmp_path / 'empty'}")
    assert "holds no images" in text
    _png(tmp_path / "imgs" / "good.png", (8, 8, 3))
    (tmp_path / "imgs" / "bad.png").write_bytes(b"\x89PNG not really")
    text = _message(image_folder, str(tmp_path / "imgs"), 8)
    assert "bad.png' is not a readable image" in text and "dataset.skip_corrupt=true" in text
    (tmp_path / "imgs" / "good.png").unlink()
    text = _message(image_folder, str(tmp_path / "imgs"), 8, 3, 0, True)
    assert "no image could be read" in text


def test_image_folder_skip_corrupt_and_mixed_sizes_and_channels(tmp_path, caplog):
    """Sizes and modes are cropped, resized and converted; a corrupt file is skipped on request."""
    _png(tmp_path / "a.png", (20, 30, 3))  # wide RGB
    _png(tmp_path / "b.png", (40, 40))  # grey
    _png(tmp_path / "c.png", (9, 9, 4))  # RGBA
    (tmp_path / "d.png").write_bytes(bytes(range(256)))
    ds = image_folder(str(tmp_path), resolution=8, channels=3, skip_corrupt=True)
    assert ds.images.shape == (3, 3, 8, 8)
    torch.testing.assert_close(ds.images, torch.full_like(ds.images, 200 / 127.5 - 1))
    assert "d.png" in caplog.text
    overrides = ["dataset=image_folder", f"dataset.path={tmp_path}", "dataset.resolution=8"]
    overrides += ["data.batch_size=2", "dataset.skip_corrupt=true", "model.attn_resolutions=[]"]
    metrics = train(compose_train([*fast_overrides(tmp_path / "run"), *overrides], tmp_path / "r"))
    assert np.isfinite(metrics["train/loss"])


def test_evaluate_image_folder_corrupt_or_wrong_size(tmp_path):
    _png(tmp_path / "f" / "a.png", (16, 16, 3))
    _png(tmp_path / "f" / "b.png", (8, 8, 3))
    cfg = _compose("evaluate", [f"images={tmp_path / 'f'}", "dataset=mnist16"], tmp_path)
    from diffusionlab.evaluation.images import load_images

    assert "'b.png' is 8x8; every image must be 16x16" in _message(load_images, cfg.images, 16)
    (tmp_path / "f" / "b.png").write_bytes(b"junk")
    assert "'b.png' is not a readable image" in _message(load_images, cfg.images, 16)


# ---------------------------------------------------------------- checkpoints
def _bad_checkpoints(folder: Path, ckpt: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected message part)."""
    folder.mkdir(exist_ok=True)
    files = {
        "missing": (folder / "missing.ckpt", "does not exist"),
        "truncated": (folder / "truncated.ckpt", "is truncated or not a PyTorch checkpoint"),
        "random": (folder / "random.ckpt", "is truncated or not a PyTorch checkpoint"),
        "tensors": (folder / "tensors.ckpt", "is not a checkpoint written by train.py"),
        "pickle": (folder / "pickle.ckpt", "holds Python objects besides tensors; refused"),
        "folder": (folder, "does not exist (a folder)"),
    }
    files["truncated"][0].write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    files["random"][0].write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"weight": torch.ones(3)}, files["tensors"][0])
    torch.save({"state_dict": {}, "hyper_parameters": {}, "obj": Path("x")}, files["pickle"][0])
    return files


def test_bad_checkpoint_files(tmp_path, ckpt):
    for name, (path, expected) in _bad_checkpoints(tmp_path / "bad", ckpt).items():
        text = _train_error(tmp_path, f"resume_ckpt={path}")
        assert text.startswith(f"resume_ckpt='{path}'") and expected in text, (name, text)
        text = _sample_error(tmp_path, f"ckpt={path}")
        assert text.startswith(f"ckpt='{path}'") and expected in text, (name, text)
        cfg = _compose("evaluate", [f"ckpt={path}", "dataset=digits"], tmp_path)
        assert expected in _message(evaluate, cfg), name


def test_checkpoint_loading_runs_no_code(tmp_path):
    """A pickle that would run code on load is refused before it can (weights_only=True)."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": Payload()}))
    text = _sample_error(tmp_path, f"ckpt={tmp_path / 'evil.ckpt'}")
    assert "refused" in text or "not a PyTorch checkpoint" in text
    assert not marker.exists()


def test_resume_from_a_different_model_config(tmp_path, ckpt):
    text = _train_error(tmp_path, f"resume_ckpt={ckpt}", "model.model_channels=8")
    assert "is from a different model config (model.model_channels: 16 -> 8)" in text
    text = _train_error(tmp_path, f"resume_ckpt={ckpt}", "schedule=vp", "parameterization=eps")
    assert "schedule._target_" in text


def test_checkpoint_whose_weights_do_not_fit_its_hparams(tmp_path, ckpt):
    state = torch.load(ckpt, weights_only=True)
    state["hyper_parameters"]["model"]["model_channels"] = 8
    torch.save(state, tmp_path / "mismatch.ckpt")
    text = _sample_error(tmp_path, f"ckpt={tmp_path / 'mismatch.ckpt'}")
    assert "its weights do not fit the model its hyperparameters describe" in text


# ---------------------------------------------------------------- seeds
@pytest.mark.parametrize(
    "spec, seeds",
    [
        ("0-3", [0, 1, 2, 3]),
        (5, [5]),
        ([0, 1, 2], [0, 1, 2]),
        (["0-2", 9], [0, 1, 2, 9]),
        ("0-2,9", [0, 1, 2, 9]),
        (" 3 - 4 ", None),
        (None, [0, 1, 2]),
    ],
)
def test_seed_forms(spec, seeds):
    if seeds is None:
        assert "cannot read" in _message(parse_seeds, spec, 3)
    else:
        assert parse_seeds(spec, 3) == seeds


@pytest.mark.parametrize("spec", ["a-b", "5-2", "-3", "", [], [1.5], "1,,2"])
def test_bad_seeds(spec):
    assert "seeds=" in _message(parse_seeds, spec, 3)


def test_unquoted_comma_seeds_are_quoted_for_hydra():
    def quoted(args):
        return prepare_args("sample", args)[0]

    assert quoted(["seeds=0-9,20", "batch_size=3"]) == ["seeds='0-9,20'", "batch_size=3"]
    assert quoted(["seeds=[0-9,20]", "seeds='1,2'"]) == ["seeds=[0-9,20]", "seeds='1,2'"]
    assert quoted(["-m", "seeds=0,1"]) == ["-m", "seeds=0,1"]


def test_readme_sample_command_with_every_seed_form(tmp_path, ckpt):
    """The README's ``sample.py ... seeds=0-63`` and the other documented forms, end to end."""
    for i, form in enumerate(["seeds=0-3", "seeds=0-1,7", "seeds=[0-1,7]", "seeds=[2,3]"]):
        out = tmp_path / str(i)
        args = [
            f"ckpt={ckpt}",
            "sampler=dpmpp_2m",
            "sampler.nfe=2",
            "num_samples=4",
            form,
            f"outdir={out}",
        ]
        args.append(f"paths.log_dir={tmp_path}")
        res = run_app("sample.py", args) if i < 2 else None
        if res is not None:
            assert res.returncode == 0, res.stderr[-2000:]
        else:
            sample(_compose("sample", args, out))
    assert sorted(p.name for p in (tmp_path / "0").glob("0*.png")) == [
        f"{s:06d}.png" for s in range(4)
    ]
    assert sorted(p.stem for p in (tmp_path / "1").glob("0*.png")) == ["000000", "000001", "000007"]
    assert sorted(p.stem for p in (tmp_path / "2").glob("0*.png")) == ["000000", "000001", "000007"]
    assert sorted(p.stem for p in (tmp_path / "3").glob("0*.png")) == ["000002", "000003"]
