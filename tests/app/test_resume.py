"""Exact resume: a run SIGKILLed mid-run and resumed from its last.ckpt ends bitwise equal to an
uninterrupted run of the same seed (weights, EMA, loss-side state, optimizer moments, LR, data
position, RNG states, logged metrics). Bitwise because on CPU with one thread every step performs
the same operations on the same inputs in the same order."""

import csv
import os
import signal
from pathlib import Path

import pytest
import torch

from diffusionlab.cli.train import train
from diffusionlab.errors import ConfigError

from .helpers import compose_train, fast_overrides, run_app

STEPS, KILL_AT = 5, 2


def _overrides(tmp_path: Path, extra: list[str]) -> list[str]:
    return [
        *fast_overrides(tmp_path),
        f"trainer.max_steps={STEPS}",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "lr_warmup_steps=3",  # the LR still changes at the resumed steps
        "data.hflip=true",
        "~callbacks.perf",  # wall-clock throughput differs between any two runs
        *extra,
    ]


def _assert_same(a, b, path: str = "") -> None:
    """Recursive bitwise equality of checkpoint contents."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path}: max diff {(a.double() - b.double()).abs().max()}"
    else:
        assert a == b, path


def _rows(run: Path, after: int) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as f:
        rows = [
            {k: v for k, v in r.items() if v != ""}  # columns depend on the keys a run has seen
            for r in csv.DictReader(f)
            if r.get("step") and int(r["step"]) >= after
        ]
    return sorted(rows, key=lambda r: (int(r["step"]), sorted(r.items())))


def _ckpt(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize(
    "extra",
    [
        ["model.dropout=0.1"],  # dropout draws from the global RNG: restored per rank
        pytest.param(["loss=edm2"], marks=pytest.mark.slow),  # learned log-variance head
        ["ema=power", "ema.snapshot_every=1"],  # every EMA profile is in the checkpoint
        # the JVP losses: sCM's adaptive head and tangent warm-up, MeanFlow's pairs and flow map
        pytest.param(
            ["parameterization=consistency", "parameterization.sigma_min=0", "loss=scm"],
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["parameterization=flow_map", "loss=meanflow", "sampler=flow_map", "model.dropout=0.1"],
            marks=pytest.mark.slow,
        ),
    ],
    ids=["dropout", "edm2", "power_ema", "scm", "meanflow"],
)
def test_sigkilled_run_resumes_bitwise(tmp_path, monkeypatch, extra):
    train(compose_train(_overrides(tmp_path, extra), tmp_path / "uninterrupted"))

    killed = tmp_path / "killed"
    here = str(Path(__file__).parent)  # the app imports kill_callback.KillAt from here
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    kill = ["+callbacks.kill._target_=kill_callback.KillAt", f"+callbacks.kill.step={KILL_AT}"]
    res = run_app("train.py", [*_overrides(tmp_path, extra), *kill, f"hydra.run.dir={killed}"])
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    stopped = _ckpt(killed)
    assert stopped["global_step"] == KILL_AT
    assert not (killed / "checkpoints" / f"step_{STEPS:06d}.ckpt").exists()

    resumed_dir = tmp_path / "resumed"
    resume = [f"resume_ckpt={killed / 'checkpoints' / 'last.ckpt'}"]
    train(compose_train(_overrides(tmp_path, extra) + resume, resumed_dir))

    full, resumed = _ckpt(tmp_path / "uninterrupted"), _ckpt(resumed_dir)
    assert full["global_step"] == resumed["global_step"] == STEPS
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "rng_states", "loops"):
        _assert_same(full[key], resumed[key], key)
    _assert_same(full["DiffusionDataModule"], resumed["DiffusionDataModule"])
    assert any(k.startswith("ema.") for k in full["state_dict"])
    assert full["optimizer_states"][0]["state"][0]["exp_avg_sq"].abs().sum() > 0
    # the run moved on after the kill: resuming did not just reload the final weights
    weights = [k for k in full["state_dict"] if k.startswith(("denoiser.", "ema.", "loss_fn."))]
    assert all(
        not torch.equal(stopped["state_dict"][k], full["state_dict"][k]) for k in weights[:3]
    )
    rows = _rows(resumed_dir, after=KILL_AT)
    assert len({r["step"] for r in rows}) == STEPS - KILL_AT
    assert rows == _rows(tmp_path / "uninterrupted", after=KILL_AT)


def _global_step(run: Path) -> int:
    return _ckpt(run)["global_step"]


def test_resume_ckpt_last_and_auto_resume(tmp_path):
    base = [*fast_overrides(tmp_path), "~callbacks.sample_grid", "~callbacks.lr_monitor"]
    base += ["callbacks.model_checkpoint.every_n_train_steps=1"]
    runs = tmp_path / "train" / "runs"
    with pytest.raises(ConfigError, match="resume_ckpt=last: no .*/train/runs/"):
        train(compose_train([*base, "resume_ckpt=last"], runs / "first"))
    train(compose_train([*base, "trainer.max_steps=2"], runs / "first"))
    # the newest run's last.ckpt
    train(compose_train([*base, "trainer.max_steps=3", "resume_ckpt=last"], runs / "second"))
    assert _global_step(runs / "second") == 3
    assert int(_rows(runs / "second", after=0)[0]["step"]) == 2  # continued, not restarted
    # the same run directory again: auto_resume picks up its own last.ckpt
    train(compose_train([*base, "trainer.max_steps=4", "auto_resume=true"], runs / "second"))
    assert _global_step(runs / "second") == 4


def test_missing_resume_ckpt_is_a_config_error(tmp_path):
    cfg = compose_train([*fast_overrides(tmp_path), "resume_ckpt=nope.ckpt"], tmp_path)
    with pytest.raises(ConfigError, match="resume_ckpt='nope.ckpt' does not exist"):
        train(cfg)
