"""Every command in docs/conditioning.md runs as written (tiny: few steps, small models)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_text_encoders import tiny_clip

from .helpers import ROOT

DOC = ROOT / "docs" / "conditioning.md"
TRAIN = (
    "data.batch_size=8 trainer.max_steps=2 logger=csv sampler.nfe=3 ~callbacks.rich_progress_bar "
    "callbacks.sample_grid.num_samples=4 trainer.enable_model_summary=false"
)
# appended to each command (the longest matching prefix): tiny sizes, everything in the test's
# folder
TINY = {
    "python train.py experiment=text_mnist": f"{TRAIN} cond.encoder.width=16 cond.encoder.depth=1",
    "python train.py experiment=sr_mnist": f"{TRAIN} model.model_channels=8",
    "python train.py": TRAIN,
    "python sample.py": "num_samples=2 sampler.nfe=3",
    "dl-prompt-accuracy": "num_samples=1 extractor_steps=5 sampler.nfe=3",
    "dl-upsample": "num_samples=2 extractor_steps=5 sampler.nfe=3",
}
MODULES = {"dl-prompt-accuracy": "prompt_accuracy", "dl-upsample": "upsample"}


def _commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    return [line for b in blocks for line in b.splitlines() if line and not line.startswith("#")]


@pytest.mark.slow
def test_every_conditioning_doc_command_runs(tmp_path):
    lines = []
    for line in _commands():
        apps = [a for a in TINY if line.startswith(a)]
        if apps:
            line += f" {TINY[max(apps, key=len)]} paths.log_dir=logs paths.cache_dir=cache"
        for app, module in MODULES.items():
            line = line.replace(app, f"python -m diffusionlab.cli.{module}")
        lines.append(line.replace("python ", f"{sys.executable} ", 1))
    assert sum(line.startswith(sys.executable) for line in lines) == 9
    for script in ("train.py", "sample.py"):
        (tmp_path / script).symlink_to(ROOT / script)
    tiny_clip(tmp_path / "text_encoders" / "clip")
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    script = "set -e\n" + "\n".join(lines) + "\n"
    res = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800
    )
    assert res.returncode == 0, res.stderr[-3000:]
    samples = sorted(Path(tmp_path, "logs", "sample").rglob("grid.png"))
    assert len(samples) == 2
    assert len(list(samples[-1].parent.glob("p001_*.png"))) == 2  # a row per prompt of the file
    accuracy = next(Path(tmp_path, "logs", "prompt_accuracy").rglob("accuracy.md")).read_text()
    assert accuracy.count("\n") == 5  # header, rule, three weights
    upsampled = list(Path(tmp_path, "logs", "upsample").rglob("metrics.json"))
    assert len(upsampled) == 2
