"""Every command of docs/samplers.md's learned-grids section runs as written, on a tiny digits
checkpoint with fewer steps and samples appended."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from .helpers import ROOT, fast_overrides, run_app

FIT = "fit.teacher_nfe=6 fit.num_samples=4 fit.num_validation=2 fit.num_heldout=4 fit.batch_size=4 fit.steps=2 device=cpu"


def _commands() -> list[str]:
    text = (ROOT / "docs" / "samplers.md").read_text()
    section = text.split("## Learned grids", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line for line in block.splitlines() if line and not line.startswith("CKPT=")]


@pytest.mark.slow
def test_every_learned_grids_doc_command_runs(tmp_path):
    train = run_app("train.py", fast_overrides(tmp_path / "run"))
    assert train.returncode == 0, train.stderr[-2000:]
    ckpt = next((tmp_path / "run").rglob("last.ckpt"))
    logs = f"paths.log_dir={tmp_path / 'logs'}"
    tiny = {
        "dl-fit-sigmas": FIT,
        "python sample.py": f"num_samples=2 batch_size=2 {logs}",
        "python evaluate.py": f"dataset=digits eval.num_samples=20 eval.extractor_steps=20 "
        f"eval.metrics=[fid] eval.cache_dir={tmp_path / 'cache'} nfe_sweep.nfe=[3] {logs}",
        "python train.py": " ".join(o for o in fast_overrides(tmp_path / "logs") if "nfe" not in o),
        "python bench/learned_grids.py": "--nfe 5 --samplers dpmpp_2m --targets gaussian16 "
        f"--steps 5 --n-fit 16 --n-test 32 --out {tmp_path / 'bench'}",
    }
    env = {**os.environ, "CKPT": str(ckpt), "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    env["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{env.get('PYTHONPATH', '')}"
    commands = _commands()
    assert [c.split(" ckpt")[0].split(" sampler")[0] for c in commands] == list(tiny)
    for line, extra in zip(commands, tiny.values(), strict=True):
        cmd = line.replace("python ", f"{sys.executable} ", 1)
        cmd = cmd.replace("dl-fit-sigmas", f"{sys.executable} -m diffusionlab.cli.fit_grid", 1)
        res = subprocess.run(
            f"{cmd} {extra}", shell=True, cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert res.returncode == 0, f"{line}\n{res.stderr[-3000:]}"
    grid = json.loads((ckpt.parent / "grids" / "dpmpp_2m_nfe10.json").read_text())
    assert len(grid["sigmas"]) == 11 and grid["sigmas"][-1] == 0.0
    result = json.loads(next((tmp_path / "logs").rglob("metrics.json")).read_text())
    assert result["sampler"]["sigmas"] == grid["sigmas"]
    assert [r["sampler"] for r in result["sweep"]] == ["dpmpp_2m/karras", "dpmpp_2m/logsnr"]
    assert (tmp_path / "bench" / "learned_grids.md").is_file()
