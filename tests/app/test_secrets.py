"""No secret reaches a file a run writes: .hydra/, hparams.yaml, checkpoints, the W&B run."""

from __future__ import annotations

from omegaconf import OmegaConf

from diffusionlab.tracking.secrets import REDACTED, redact, secret_values

from .helpers import fast_overrides, run_app


def test_redact_by_key_name_and_by_value():
    env = {"WANDB_API_KEY": "k-123456", "HF_TOKEN": "hf-abcdef", "HOME": "/root", "X_TOKEN": "ab"}
    config = {"a": {"api_key": "cfg-999", "num_tokens": 7}, "password": None}
    secrets = secret_values(config, env)
    assert secrets == {"k-123456", "hf-abcdef", "cfg-999"}
    out = redact({**config, "note": "uses hf-abcdef here", "args": ["k-123456"]}, secrets)
    assert out == {
        "a": {"api_key": REDACTED, "num_tokens": 7},
        "password": None,
        "note": f"uses {REDACTED} here",
        "args": [REDACTED],
    }


def test_no_secret_in_any_file_of_a_wandb_run(tmp_path):
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb"),
        "WANDB_API_KEY": "wandbSECRET0123456789abcdef0123456789abcd",
        "HF_TOKEN": "hfSECRETtoken",
        "HYDRA_FULL_ERROR": "0",
    }
    args = [f"{a}" for a in fast_overrides(tmp_path) if a != "logger=csv"]
    args += ["logger=many", "+extra.api_key=cfgSECRETkey", "+extra.note=${oc.env:HF_TOKEN}"]
    args += ["+extra.db_password=pwSECRET", f"hydra.run.dir={tmp_path}/run"]
    res = run_app("train.py", args, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SECRET" not in res.stdout + res.stderr
    run = tmp_path / "run"
    written = [p for p in [*run.rglob("*"), *(tmp_path / "wandb").rglob("*")] if p.is_file()]
    assert any(p.suffix == ".wandb" for p in written) and any(
        p.name == "hparams.yaml" for p in written
    )
    leaks = [p for p in written if b"SECRET" in p.read_bytes()]
    assert not leaks
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert saved.extra.api_key == REDACTED and saved.extra.db_password == REDACTED
