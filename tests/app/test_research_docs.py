"""Every command in docs/repa.md and docs/protocol.md runs as written, kept tiny by overrides
appended to it (the 8x8 digits, a few steps, few samples) and with the DINOv2 path of the doc
replaced by a tiny randomly initialised DINOv2 file; the outputs the docs promise exist."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusionlab.evaluation.protocol import Protocol
from diffusionlab.evaluation.train_extractor import train_and_save
from diffusionlab.networks.dinov2 import DINOv2

from .helpers import ROOT

TRAIN = [
    "dataset=digits",
    "data.batch_size=16",
    "trainer.max_steps=3",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "~callbacks.rich_progress_bar",
    "callbacks.sample_grid.every_n_steps=0",
    "callbacks.sample_grid.n=10",
    "sampler.nfe=3",
]


def _commands(doc: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "docs" / doc).read_text(), re.S)
    return [line for b in blocks for line in b.splitlines() if line and not line.startswith("#")]


def _dinov2(tmp_path: Path, name: str) -> Path:
    torch.manual_seed(0)
    model = DINOv2(384, 1, 6, 14, 56)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = tmp_path / name
    torch.save(model.state_dict(), path)
    return path


def _run(line: str, extra: list[str], tmp_path: Path) -> None:
    for script in ("train.py", "sample.py", "evaluate.py", "bench"):
        if not (tmp_path / script).exists():
            (tmp_path / script).symlink_to(ROOT / script)
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    cmd = f"{line.replace('python ', f'{sys.executable} ', 1)} {' '.join(extra)}"
    res = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"


@pytest.mark.slow
def test_every_repa_doc_command_runs(tmp_path):
    commands = _commands("repa.md")
    assert [c.split()[1] for c in commands] == [*["train.py"] * 3, "bench/repa.py"]
    cache = tmp_path / "cache"
    train_and_save(
        __import__("diffusionlab.data", fromlist=["digits"]).digits(), "digits", cache, steps=30
    )
    dinov2 = _dinov2(tmp_path, "dinov2_vits14_pretrain.pth")
    for i, line in enumerate(commands):
        line = line.replace("/path/to/dinov2_vits14_pretrain.pth", str(dinov2))
        if line.startswith("python bench/"):
            extra = [
                "--steps 2 --every 1 --seeds 0 --num-samples 20 --nfe 3 --jobs 1 --threads 1",
                f"--out {tmp_path / 'bench'}",
                "--overrides dataset=digits data.batch_size=16 trainer.log_every_n_steps=1 callbacks.fid.extractor_steps=30",
            ]
            _run(line, extra, tmp_path)
            result = json.loads((tmp_path / "bench" / "repa.json").read_text())
            assert set(result["curves"]) == {"baseline", "repa"}
            assert (tmp_path / "bench" / "fid_vs_steps.png").is_file()
            continue
        extra = [*TRAIN, f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path / f'run{i}'}"]
        if "dinov2" in line:
            extra.append("repa.encoder.resolution=28")
        _run(line, extra, tmp_path)
        csv_text = next((tmp_path / f"run{i}").rglob("metrics.csv")).read_text()
        assert "train/repa_align" in csv_text and "train/diffusion_loss" in csv_text


@pytest.mark.slow
def test_every_protocol_doc_command_runs(tmp_path):
    commands = _commands("protocol.md")
    assert [c.split()[1] for c in commands] == [
        "train.py",
        "evaluate.py",
        "evaluate.py",
        "sample.py",
        "evaluate.py",
    ]
    dinov2 = _dinov2(tmp_path, "dinov2_vitl14_pretrain.pth")
    results = []
    for i, line in enumerate(commands):
        line = line.replace("/path/to/dinov2_vitl14_pretrain.pth", str(dinov2))
        script = line.split()[1]
        if script == "train.py":
            extra = [*TRAIN, "trainer.max_steps=20"]
        elif script == "sample.py":
            extra = ["sampler=euler", "sampler.nfe=3", "png=false", f"outdir={tmp_path / 'grid'}"]
        else:
            extra = [
                "sampler=euler",
                "sampler.nfe=3",
                "eval.num_samples=30",
                "eval.extractor_steps=30",
                "eval.split=test",
                f"eval.cache_dir={tmp_path / 'cache'}",
                f"paths.output_dir={tmp_path / f'eval{i}'}",
            ]
        _run(line, extra, tmp_path)
        if script == "evaluate.py":
            results.append(json.loads((tmp_path / f"eval{i}" / "metrics.json").read_text()))
    repeats, sweep, dino = results
    assert Protocol.from_dict(repeats["protocol"]).seeds == "0-29,30-59,60-89"
    assert {"fid_mean", "fid_std"} <= set(repeats["metrics"])
    assert len(sweep["guidance_sweep"]) == 6 and "class_accuracy" in sweep["guidance_sweep"][0]
    assert (tmp_path / "eval2" / "fid_vs_guidance.png").is_file()
    assert "fd_dinov2" in dino["metrics"]
    assert Protocol.from_dict(dino["protocol"]).extractor_weights.endswith(str(dinov2))
    assert (tmp_path / "grid" / "grid.png").is_file()
