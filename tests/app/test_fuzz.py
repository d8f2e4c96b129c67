"""Fuzzing the three apps: random overrides, random bytes as images and checkpoints. Each run ends
normally or with one ``error: ...`` line and exit status 1: never a traceback, never a hang."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from diffusionlab.cli import evaluate, sample, train

from .fuzz import cases
from .helpers import compose_train, fast_overrides, run_app

MAINS = {"train": train.main, "sample": sample.main, "evaluate": evaluate.main}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    train.train(compose_train([*fast_overrides(run), "trainer.max_steps=2"], run))
    return run / "checkpoints" / "last.ckpt"


def base_args(app: str, tmp: Path, ckpt: Path) -> list[str]:
    """A valid, quick run of ``app`` (random overrides come after these)."""
    run = [f"hydra.run.dir={tmp / 'out'}"]
    if app == "train":
        return [*fast_overrides(tmp, callbacks=False), "trainer.max_steps=2", *run]
    common = [f"ckpt={ckpt}", "sampler.nfe=2", "device=cpu", *run]
    if app == "sample":
        return [*common, "num_samples=2"]
    return [*common, "dataset=digits", "eval.num_samples=8", "eval.batch_size=8"]


def _evaluate_extra(tmp: Path) -> list[str]:
    return [
        "eval.extractor_steps=5",
        "eval.metrics=[fid]",
        f"eval.cache_dir={tmp.parent / 'cache'}",
    ]


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang


def run_in_process(app: str, args: list[str], timeout: int = 60) -> tuple[int, str]:
    """``python <app>.py <args>`` in this process: (exit status, stderr)."""
    GlobalHydra.instance().clear()
    err = io.StringIO()
    argv, sys.argv = sys.argv, [f"{app}.py", *args]
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    code = 0
    try:
        with contextlib.redirect_stderr(err):
            MAINS[app]()
    except SystemExit as e:
        code = 1 if isinstance(e.code, str) else int(e.code or 0)
        if isinstance(e.code, str):
            err.write(e.code + "\n")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        sys.argv = argv
        GlobalHydra.instance().clear()
    return code, err.getvalue()


def check(app: str, args: list[str], code: int, stderr: str) -> None:
    assert "Traceback" not in stderr, (app, args, stderr[-3000:])
    if code != 0:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        assert code == 1 and last.startswith("error: "), (app, args, code, stderr[-3000:])


def _run_cases(n: int, seed: int, tmp_path: Path, ckpt: Path, monkeypatch) -> dict[str, int]:
    monkeypatch.setenv("_DIFFUSIONLAB_USER_HYDRA_FULL_ERROR", "0")
    outcomes = {"ok": 0, "error": 0}
    for i, (app, args) in enumerate(cases(n, seed, tmp_path, ckpt)):
        tmp = tmp_path / f"case{i}"
        full = base_args(app, tmp, ckpt) + (_evaluate_extra(tmp) if app == "evaluate" else [])
        code, stderr = run_in_process(app, [*full, *args])
        check(app, args, code, stderr)
        outcomes["ok" if code == 0 else "error"] += 1
    return outcomes


def test_fuzz_overrides_and_corrupt_files(tmp_path, ckpt, monkeypatch):
    outcomes = _run_cases(20, 0, tmp_path, ckpt, monkeypatch)
    assert outcomes["error"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_fuzz_many(tmp_path, ckpt, monkeypatch, seed):
    _run_cases(40, seed, tmp_path, ckpt, monkeypatch)


def test_fuzz_real_processes(tmp_path, ckpt):
    """Random bytes as a checkpoint and as images, in real processes."""
    (tmp_path / "rand.ckpt").write_bytes(os.urandom(1000))
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    runs = [
        ("sample", [*base_args("sample", tmp_path, ckpt), f"ckpt={tmp_path / 'rand.ckpt'}"]),
        (
            "train",
            [*base_args("train", tmp_path, ckpt), "dataset=image_folder", f"dataset.path={folder}"],
        ),
    ]
    for app, args in runs:
        res = run_app(f"{app}.py", args, timeout=120)
        assert res.returncode == 1
        check(app, args, res.returncode, res.stderr)
