"""Every command of docs/published_models.md runs as written, on tiny pickles (EDM's CIFAR-10
model as an 8x8 DDPM++, edm2's latent models with a tiny diffusers VAE beside them) with fewer
samples and steps appended, and the digits / domain extractor in place of CIFAR-10 / Inception
(neither can be downloaded here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from app.helpers import ROOT, fast_overrides

from .tiny_pickles import write_tiny

EVAL = "dataset=digits paths.cache_dir={cache} eval.extractor=domain eval.inception_weights=null eval.num_samples=20 eval.repeats=1 eval.extractor_steps=20 eval.metrics=[fid] device=cpu"
FIT = "fit.teacher_nfe=6 fit.num_samples=4 fit.num_validation=2 fit.num_heldout=4 fit.batch_size=4 fit.steps=2 device=cpu"
TINY_MODEL = "model=unet_tiny model.model_channels=16 model.channel_mult=[1,2] model.num_blocks=1 model.attn_resolutions=[4] model.augment_dim=9"


def _blocks() -> list[str]:
    text = (ROOT / "docs" / "published_models.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines += [ln for ln in block.splitlines() if ln and not re.match(r"^[A-Z]+=", ln)]
    return lines


def _python_snippet() -> str:
    text = (ROOT / "docs" / "published_models.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", text, re.S)
    return snippet


def _tiny_vae(folder) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(5)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
    ).save_pretrained(folder)


@pytest.mark.slow
def test_every_published_models_doc_command_runs(tmp_path):
    pytest.importorskip("diffusers")
    models = tmp_path / "models"
    models.mkdir()
    # EDM's unconditional CIFAR-10 VP model: EDMPrecond + DDPM++ with augmentation labels
    pkl, _ = write_tiny(
        "edm_ddpmpp", models, channels=1, label_dim=0, file="edm-cifar10-uncond.pkl"
    )
    net, _ = write_tiny("edm2", models, file="edm2-img512-s-2147483-0.070.pkl")
    gnet, _ = write_tiny("edm2", models, seed=1, file="edm2-img512-xs-0134217-0.125.pkl")
    _tiny_vae(models / "sd-vae-ft-mse")
    logs = f"paths.log_dir={tmp_path / 'logs'}"
    ev = EVAL.format(cache=tmp_path / "cache")
    train = " ".join(o for o in fast_overrides(tmp_path / "logs") if "nfe" not in o)
    tiny = [
        ("python sample.py ckpt=$PKL", f"seeds=0-3 outdir={tmp_path / 'o1'} device=cpu {logs}"),
        ("python evaluate.py ckpt=$PKL", f"{ev} {logs}"),
        ("dl-fit-sigmas ckpt=$PKL", FIT),
        ("python evaluate.py ckpt=$PKL", f"{ev} {logs}"),
        ("python evaluate.py ckpt=$PKL", f"{ev} nfe_sweep.nfe=[10,12] {logs}"),
        ("python sample.py ckpt=$NET", f"seeds=0-1 outdir={tmp_path / 'o2'} device=cpu {logs}"),
        ("dl-export ckpt=$NET", ""),
        ("python train.py", f"{train} {TINY_MODEL} trainer=cpu data.num_workers=0"),
        ("dl-export ckpt=$CKPT", ""),
        (
            "python sample.py ckpt=exported/my-model",
            f"num_samples=2 sampler.nfe=3 device=cpu {logs}",
        ),
        ("dl-export ckpt=$PKL", ""),
    ]
    commands = _blocks()
    assert len(commands) == len(tiny)
    env = {**os.environ, "PKL": str(pkl), "NET": str(net), "GNET": str(gnet)}
    env.update(WANDB_MODE="disabled", HYDRA_FULL_ERROR="0", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.pop("DL_VAE_DIR", None)
    for line, (prefix, extra) in zip(commands, tiny, strict=True):
        assert line.startswith(prefix), (line, prefix)
        cmd = re.sub(r"^python (\S+)", rf"{sys.executable} {ROOT}/\1", line)
        cmd = re.sub(
            r"^dl-([a-z-]+)",
            lambda m: f"{sys.executable} -m diffusionlab.cli." + m.group(1).replace("-", "_"),
            cmd,
        )
        res = subprocess.run(
            f"{cmd} {extra}", shell=True, cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert res.returncode == 0, f"{line}\n{res.stderr[-3000:]}"
        if line.startswith("python train.py"):  # the fine-tuned run's checkpoint, for $CKPT
            env["CKPT"] = str(next((tmp_path / "logs").rglob("last.ckpt")))
    assert (models / "grids" / "dpmpp_2m_nfe10.json").is_file()
    assert len(list((tmp_path / "o1").glob("0*.png"))) == 4
    assert len(list((tmp_path / "o2").glob("0*.png"))) == 2  # decoded through the VAE
    for folder in ("my-model", "edm2-img512-s", "edm-cifar10-uncond"):
        assert (tmp_path / "exported" / folder / "model.safetensors").is_file()
    sweep = next((tmp_path / "logs").rglob("nfe_sweep.csv")).read_text()
    assert "dpmpp_2m" in sweep
    # the Python snippet, in the same folder
    snippet = subprocess.run(
        [sys.executable, "-c", _python_snippet()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert snippet.returncode == 0, snippet.stderr[-2000:]
    assert "[1, 8, 8]" in snippet.stdout
