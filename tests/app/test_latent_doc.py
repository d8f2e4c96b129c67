"""Every command in docs/latent.md runs as written (tiny: few steps, small autoencoder)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT

DOC = ROOT / "docs" / "latent.md"
# appended to each app's command: tiny sizes, everything under the test's folder
TINY = {
    "dl-train-autoencoder": "autoencoder.channels=8 max_steps=2",
    "python train.py": "data.batch_size=16 trainer.max_steps=2 logger=csv sampler.nfe=3 "
    "~callbacks.rich_progress_bar callbacks.sample_grid.num_samples=4 trainer.enable_model_summary=false",
    "python sample.py": "num_samples=4 sampler.nfe=3",
    "python evaluate.py": "eval.num_samples=8 eval.extractor_steps=5 sampler.nfe=3",
}


def _commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    return [line for b in blocks for line in b.splitlines() if line and not line.startswith("#")]


@pytest.mark.slow
def test_every_latent_doc_command_runs(tmp_path):
    lines = []
    for line in _commands():
        app = next((a for a in TINY if line.startswith(a)), None)
        if app is not None:
            line += f" {TINY[app]} paths.log_dir=logs paths.cache_dir=cache"
        line = line.replace("dl-train-autoencoder", "python -m diffusionlab.cli.train_autoencoder")
        lines.append(line.replace("python ", f"{sys.executable} ", 1))
    assert sum(line.startswith(sys.executable) for line in lines) == 4
    for script in ("train.py", "sample.py", "evaluate.py"):
        (tmp_path / script).symlink_to(ROOT / script)
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    script = "set -e\n" + "\n".join(lines) + "\n"
    res = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stderr[-3000:]
    grid = next(Path(tmp_path, "logs", "sample").rglob("grid.png"))
    assert len(list(grid.parent.glob("0*.png"))) == 4
    metrics = next(Path(tmp_path, "logs", "evaluate").rglob("metrics.json")).read_text()
    assert '"dataset": "mnist"' in metrics
