"""Run names, groups and configs from Hydra's job config (as the apps see it)."""

from pathlib import Path

from omegaconf import OmegaConf

from diffusionlab.tracking.run_identity import run_config, run_group, run_name, swept_keys


def _hydra(mode: str, task: list[str], tmp_path: Path) -> OmegaConf:
    return OmegaConf.create(
        {
            "mode": mode,
            "overrides": {"task": task},
            "sweep": {"dir": str(tmp_path / "multiruns" / "2026-01-01_00-00-00")},
            "runtime": {"output_dir": str(tmp_path / "runs" / "2026-01-02_00-00-00")},
        }
    )


def test_single_run_name_drops_plumbing_keys(tmp_path):
    task = [
        "paths.log_dir=/x",
        "schedule=vp",
        "~callbacks.rich_progress_bar",
        "trainer.max_steps=9",
    ]
    hydra = _hydra("RUN", task, tmp_path)
    assert run_name(hydra) == "schedule=vp,trainer.max_steps=9"
    assert run_name(hydra, exclude=["paths", "callbacks", "trainer"]) == "schedule=vp"
    assert run_name(_hydra("RUN", ["paths.log_dir=/x"], tmp_path)) == "default"
    assert run_name(None) == "default"
    assert run_group(hydra) == "2026-01-02_00-00-00"
    assert run_group(None, fallback="/a/b/run7") == "run7"


def test_multirun_name_keeps_only_swept_keys(tmp_path):
    sweep = tmp_path / "multiruns" / "2026-01-01_00-00-00"
    sweep.mkdir(parents=True)
    swept = ["schedule=vp,edm", "seed=1", "parameterization=glob(*)", "+optimizer.lr=range(1,3)"]
    OmegaConf.save({"hydra": {"overrides": {"task": swept}}}, sweep / "multirun.yaml")
    assert swept_keys(sweep) == {"schedule", "parameterization", "optimizer.lr"}
    job = ["schedule=edm", "seed=1", "parameterization=v", "+optimizer.lr=2"]
    hydra = _hydra("MULTIRUN", job, tmp_path)
    assert run_name(hydra) == "schedule=edm,parameterization=v,+optimizer.lr=2"
    assert run_group(hydra) == "2026-01-01_00-00-00"
    (sweep / "multirun.yaml").unlink()  # another sweeper: every override names the job
    assert run_name(hydra) == ",".join(job)


def test_run_config_puts_choices_on_top():
    cfg = OmegaConf.create({"seed": 3, "schedule": {"_target_": "VP", "beta": "${seed}"}})
    out = run_config(cfg, {"schedule": "vp", "experiment": None})
    assert out == {
        "seed": 3,
        "schedule_cfg": {"_target_": "VP", "beta": 3},
        "schedule": "vp",
        "experiment": None,
    }


def test_run_config_redacts_secrets_for_every_logger(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "envSECRETkey0123")
    cfg = OmegaConf.create(
        {"extra": {"api_key": "cfgSECRET", "note": "uses envSECRETkey0123"}, "seed": 1}
    )
    out = run_config(cfg, {})
    assert out["seed"] == 1 and "SECRET" not in str(out)
