"""W&B mode resolution: env wins, then login state; never offline=True."""

from diffusionlab.tracking.loggers import resolve_wandb_mode


def test_env_mode_wins(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"
    assert resolve_wandb_mode("online") == "online"


def test_auto_is_offline_without_login(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_wandb_mode("auto") == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password x\n")
    assert resolve_wandb_mode("auto") == "online"


def test_finish_wandb_run_ends_each_run_also_on_error(monkeypatch, tmp_path):
    import pytest
    import wandb

    from app.wandb_log import offline_runs
    from diffusionlab.tracking.loggers import finish_wandb_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home"))
    wandb.teardown()  # forget settings an earlier in-process test (W&B disabled) left behind
    with pytest.raises(RuntimeError), finish_wandb_run():
        wandb.init(dir=tmp_path / "a", project="t")
        raise RuntimeError("job failed")
    assert wandb.run is None
    with finish_wandb_run():
        wandb.init(dir=tmp_path / "b", project="t")
    assert wandb.run is None
    with pytest.raises(SystemExit), finish_wandb_run():  # Lightning's exit after SIGTERM
        wandb.init(dir=tmp_path / "c", project="t")
        raise SystemExit()
    wandb.teardown()  # in-process runs reach their files when the W&B service shuts down
    (failed,) = offline_runs(tmp_path / "a")
    (ok,) = offline_runs(tmp_path / "b")
    (preempted,) = offline_runs(tmp_path / "c")
    assert (failed.exit_code, ok.exit_code) == (1, 0) and failed.id != ok.id
    assert preempted.exit_code == 0
