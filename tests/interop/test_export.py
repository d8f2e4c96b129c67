"""dl-export: a training checkpoint (and an NVlabs pickle) as a self-contained folder; the round
trip is bitwise, the folder loads without Lightning, and every app takes it as ckpt=."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from app.helpers import ROOT, compose_train, fast_overrides
from diffusionlab.cli.export import export
from diffusionlab.cli.sample import sample
from diffusionlab.cli.train import train
from diffusionlab.config import CONF_DIR
from diffusionlab.errors import ConfigError
from diffusionlab.interop.export import read_export
from diffusionlab.sampling.checkpoint import load_module, run_config
from diffusionlab.sampling.generator import DiffusionGenerator
from diffusionlab.training.checkpoint_io import read_checkpoint

from .tiny_pickles import write_tiny


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture(scope="module")
def power_run(tmp_path_factory) -> Path:
    """A 4-step digits run with two EMA profiles, its .hydra config and a logged FID."""
    tmp = tmp_path_factory.mktemp("power")
    run = tmp / "run"
    overrides = [
        *fast_overrides(tmp),
        "~callbacks.sample_grid",
        "~callbacks.perf",
        "trainer.max_steps=4",
        "label_dim=10",
        "ema=power",
        "ema.sigma_rels=[0.05,0.1]",
        "ema.snapshot_every=0",
    ]
    cfg = compose_train(overrides, run)
    train(cfg)
    (run / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    (run / "metrics.csv").write_text("step,eval/fid,train/loss\n2,,0.5\n4,12.5,0.4\n")
    return run


def _export(ckpt, dest, *extra):
    return export(_compose("export", [f"ckpt={ckpt}", f"dest={dest}", *extra]))


def test_export_round_trip_is_bitwise(power_run, tmp_path):
    ckpt = power_run / "checkpoints" / "last.ckpt"
    state = read_checkpoint(ckpt, "ckpt")["state_dict"]
    dest = _export(ckpt, tmp_path / "m")
    assert {p.name for p in dest.iterdir()} == {"model.safetensors", "config.yaml", "README.md"}
    saved = load_file(dest / "model.safetensors")
    ema = {k[len("ema.net.") :]: v for k, v in state.items() if k.startswith("ema.net.")}
    assert saved.keys() == ema.keys() and all(torch.equal(saved[k], ema[k]) for k in ema)
    # the second profile, by its sigma_rel, and the raw weights
    other = read_export(_export(ckpt, tmp_path / "p", "weights=0.1"))
    prof = {k[len("ema_profiles.0.net.") :]: v for k, v in state.items() if "profiles.0.net." in k}
    assert all(torch.equal(other.net_state[k], prof[k]) for k in prof)
    assert other.hparams["ema"]["sigma_rels"] == [0.1]
    raw = read_export(_export(ckpt, tmp_path / "r", "weights=raw")).net_state
    assert any(not torch.equal(raw[k], ema[k]) for k in ema)
    # the same module, the same images
    original, exported = (load_module(str(p), torch.device("cpu")) for p in (ckpt, dest))
    assert exported.hparams.model == original.hparams.model and exported.label_dim == 10
    smp = {"name": "heun", "nfe": 5}
    a = DiffusionGenerator.from_module(original, smp).generate([3, 4], class_label=2)
    b = DiffusionGenerator.from_module(exported, smp).generate([3, 4], class_label=2)
    assert torch.equal(a, b)


def test_model_card_and_run_record(power_run, tmp_path):
    ckpt = power_run / "checkpoints" / "last.ckpt"
    metrics = tmp_path / "metrics.json"
    metrics.write_text(
        json.dumps(
            {
                "metrics": {"fid_min": 3.25, "kid_mean": 0.01},
                "num_samples": 500,
                "sampler": {"name": "heun", "nfe": 35},
            }
        )
    )
    dest = _export(ckpt, tmp_path / "m", f"metrics={metrics}")
    card = (dest / "README.md").read_text()
    assert "SongUNet" in card and "training steps | 4" in card
    assert (
        "12.5 at step 4" in card and "fid_min 3.25" in card and "(500 samples, heun NFE 35)" in card
    )
    assert "diffusionlab.data.digits" in card and "power EMA, sigma_rel 0.05" in card
    # evaluate.py's reference dataset comes from the folder, as from a run directory
    assert run_config(str(dest)).dataset._target_ == "diffusionlab.data.digits"
    with pytest.raises(ConfigError, match="exists and is not empty"):
        _export(ckpt, dest)
    with pytest.raises(ConfigError, match="not one of the run's EMA profiles"):
        _export(ckpt, tmp_path / "x", "weights=0.2")


def test_export_loads_without_lightning(power_run, tmp_path):
    dest = _export(power_run / "checkpoints" / "last.ckpt", tmp_path / "m")
    module = load_module(str(dest), torch.device("cpu"))
    x, sigma = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.ones(2)
    labels = torch.eye(10)[[1, 2]]
    torch.save({"x": x, "sigma": sigma, "labels": labels}, tmp_path / "inputs.pt")
    with torch.no_grad():
        want = module.ema(x, sigma, class_labels=labels)
    script = f"""
import sys, torch
for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
    sys.modules[name] = None  # any import of them fails
from diffusionlab.interop.export import read_export
from diffusionlab.interop.model import build_denoiser
d = build_denoiser(read_export({str(dest)!r}))
i = torch.load({str(tmp_path / "inputs.pt")!r})
torch.save(d(i["x"], i["sigma"], class_labels=i["labels"]), {str(tmp_path / "out.pt")!r})
assert not any(m.startswith("lightning") for m in sys.modules if sys.modules[m] is not None)
"""
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), want)


def test_sample_app_takes_pickles_and_exported_folders(tmp_path):
    pkl, _ = write_tiny("edm_ddpmpp", tmp_path)
    dest = _export(pkl, tmp_path / "exported")
    assert read_export(dest).info["class"] == "EDMPrecond"
    outs = []
    for ckpt in (pkl, dest):
        out = tmp_path / f"out_{Path(ckpt).stem}"
        cfg = _compose(
            "sample",
            [
                f"ckpt={ckpt}",
                "sampler=heun",
                "sampler.nfe=5",
                "num_samples=3",
                "npz=true",
                f"outdir={out}",
                "device=cpu",
                "wandb.mode=disabled",
                f"paths.output_dir={out}",
            ],
        )
        sample(cfg)
        outs.append(dict(np.load(out / "samples.npz")))
        assert len(list(out.glob("0*.png"))) == 3
    assert (outs[0]["samples"] == outs[1]["samples"]).all()
    assert (outs[0]["labels"] == outs[1]["labels"]).all()


def test_init_ckpt_starts_a_run_from_a_pickle(tmp_path):
    from diffusionlab.cli.train import build
    from diffusionlab.interop.module import init_weights

    pkl, net = write_tiny("edm_ddpmpp", tmp_path, channels=1)
    model = [
        "model=unet_tiny",
        "model.model_channels=16",
        "model.channel_mult=[1,2]",
        "model.num_blocks=1",
        "model.attn_resolutions=[4]",
        "model.augment_dim=9",
        "label_dim=10",
    ]
    cfg = compose_train([*fast_overrides(tmp_path), *model], tmp_path / "run")
    module, _ = build(cfg)
    init_weights(module, str(pkl))
    for d in (module.denoiser, module.ema):
        assert all(torch.equal(v, d.net.state_dict()[k]) for k, v in net.state_dict().items())
    cfg = compose_train([*fast_overrides(tmp_path), *model[:-2], "label_dim=10"], tmp_path / "r2")
    module, _ = build(cfg)
    with pytest.raises(ConfigError, match=r"model.augment_dim: 9 vs 0"):
        init_weights(module, str(pkl), "init_ckpt")
