"""run.json: written at train start into the run folder, read back for any checkpoint of the run."""

from __future__ import annotations

import json

from diffusionlab.tracking.run_record import config_digest, read_run_record, write_run_record
from diffusionlab.tracking.wandb_runs import train_run_of


def test_run_json_names_the_run_and_digests_its_config(tmp_path):
    run = tmp_path / "2024-01-01_00-00-00"
    config = {"schedule": "edm", "trainer_cfg": {"max_steps": 3}}
    assert write_run_record(run, config, []) == run / "run.json"
    ckpt = run / "checkpoints" / "last.ckpt"
    record, run_dir = read_run_record(ckpt)
    assert run_dir == run.resolve() and record["dir"] == str(run.resolve())
    # outside a Hydra app and without W&B: the default name, the folder as group, an own id
    assert (record["name"], record["group"]) == ("default", run.name)
    assert record["wandb_id"] is None and len(record["run_id"]) == 8
    assert record["config_sha256"] == config_digest(
        {"trainer_cfg": {"max_steps": 3}, "schedule": "edm"}
    )
    assert record["config_sha256"] != config_digest({**config, "schedule": "vp"})
    assert train_run_of(ckpt) is None  # no W&B run to join


def test_evaluate_finds_the_wandb_run_of_any_checkpoint_of_the_run(tmp_path):
    run = tmp_path / "run"
    write_run_record(run, {}, [])
    record = json.loads((run / "run.json").read_text())
    record.update(wandb_id="ab12cd34", name="schedule=vp", group="sweep", wandb_project="p")
    (run / "run.json").write_text(json.dumps(record))
    want = {"id": "ab12cd34", "name": "schedule=vp", "group": "sweep", "dir": str(run.resolve())}
    want |= {"project": "p", "entity": None}
    assert train_run_of(run / "checkpoints" / "step_000003.ckpt") == want
    assert train_run_of(run / "ema_reconstructed" / "ema_0.1.ckpt") == want  # dl-reconstruct-ema
    assert read_run_record(tmp_path / "elsewhere" / "x.ckpt") is None
    (run / "run.json").write_text("{ torn")
    assert train_run_of(run / "checkpoints" / "last.ckpt") is None
