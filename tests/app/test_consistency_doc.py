"""Every command of docs/consistency.md runs as written, on the 8x8 digits with a tiny network,
fewer steps and fewer samples appended."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from .helpers import ROOT, fast_overrides


def _commands() -> list[str]:
    text = (ROOT / "docs" / "consistency.md").read_text()
    section = text.split("## Commands", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line for line in block.splitlines() if line]


@pytest.mark.slow
def test_every_consistency_doc_command_runs(tmp_path):
    logs = tmp_path / "logs"
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    env["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{env.get('PYTHONPATH', '')}"
    evaluate = (
        f"dataset=digits eval.num_samples=20 eval.extractor_steps=20 eval.metrics=[fid] "
        f"eval.cache_dir={tmp_path / 'cache'} paths.log_dir={logs}"
    )
    ran = []
    for i, line in enumerate(_commands()):
        if line.startswith(("CKPT=", "ECT=", "MF=")):  # the checkpoint the previous training wrote
            name = line.split("=", 1)[0]
            (env[name],) = [str(p) for p in (tmp_path / f"run{i - 1}").rglob("last.ckpt")]
            continue
        if line.startswith("python train.py"):
            extra = " ".join(fast_overrides(tmp_path / f"run{i}"))
        elif line.startswith("python sample.py"):
            extra = f"num_samples=2 batch_size=2 paths.log_dir={logs}"
        else:
            assert line.startswith("python evaluate.py"), line
            extra = evaluate
        cmd = line.replace("python ", f"{sys.executable} ", 1)
        res = subprocess.run(
            f"{cmd} {extra}", shell=True, cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert res.returncode == 0, f"{line}\n{res.stderr[-3000:]}"
        ran.append(line.split()[1])
    assert ran == ["train.py", "train.py", "sample.py", "sample.py", "evaluate.py"] + [
        "evaluate.py",
        "train.py",
        "train.py",
        "train.py",
        "train.py",
        "sample.py",
        "evaluate.py",
    ]
    sweeps = [json.loads(p.read_text()) for p in logs.rglob("metrics.json")]
    swept = [s for s in sweeps if s.get("sweep")]
    assert [r["nfe"] for r in swept[0]["sweep"]] == [1, 2, 4]
