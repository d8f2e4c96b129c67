"""Global batch: the same seed and global batch give the same weights whatever the split.

One process, gradient accumulation (``data.batch_per_device``), two DDP processes (ddp_spawn,
gloo) and two simulated nodes (NODE_RANK 0/1) train on the same samples with the same sigma and
noise per sample (data/sampler.py), and the DDP gradient is the mean over ranks of per-rank means
of equal-sized micro-batches, i.e. the global-batch mean. They are not bitwise equal: the
gradient is summed in another order (per micro-batch, then across ranks by all-reduce), and
convolutions on 8 vs 16 images may pick other kernels; float32 rounding then differs in the last
bits. Adam divides by sqrt(v), which can magnify that for near-zero gradient entries. The runs
use dropout and class-label dropout: each sample's masks come from its own streams of the
batched generator, as its sigma and noise do. Measured after 3 steps (lr 1e-3, weights of order
0.1): at most 1.5e-6 on any weight, EMA weight or Adam moment for accumulation (5.5e-7 without
dropout), against 4e-3 when the masks come from the process RNG and 0.8 for another seed; the
tests allow 5e-6.
"""

from pathlib import Path

import pytest
import torch

from diffusionlab.cli.train import train
from diffusionlab.errors import ConfigError
from diffusionlab.sampling.callbacks import SampleGrid

from .helpers import compose_train, fast_overrides, run_app, run_two_nodes

ATOL = 5e-6


def _overrides(tmp_path: Path) -> list[str]:
    # lr warm-up off so the first steps move the weights by the full learning rate; dropout and
    # class-label dropout on: their masks are per sample too (networks/layers.py)
    return [
        *fast_overrides(tmp_path),
        "data.batch_size=16",
        "lr_warmup_steps=0",
        "model.dropout=0.2",
        "label_dim=10",
        "model.label_dropout=0.2",
    ]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    state = dict(ckpt["state_dict"])
    for i, s in ckpt["optimizer_states"][0]["state"].items():
        state |= {f"adam.{i}.exp_avg": s["exp_avg"], f"adam.{i}.exp_avg_sq": s["exp_avg_sq"]}
    return state


def _assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst < ATOL, worst


def _two_nodes(tmp_path: Path, extra: list[str]) -> Path:
    """Two single-process 'nodes' on 127.0.0.1 (as torchrun or SLURM would start them)."""
    run_two_nodes(
        lambda rank: [
            *_overrides(tmp_path / f"node{rank}"),
            "trainer=cpu",
            "+trainer.strategy=ddp",
            "trainer.num_nodes=2",
            "trainer.devices=1",
            f"hydra.run.dir={tmp_path / f'node{rank}'}",
            *extra,
        ]
    )
    return tmp_path / "node0"


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, torch.Tensor]:
    run = tmp_path_factory.mktemp("single")
    train(compose_train(_overrides(run), run))
    return _weights(run)


def test_gradient_accumulation_matches_one_batch(tmp_path, single):
    train(compose_train([*_overrides(tmp_path), "data.batch_per_device=4"], tmp_path))
    _assert_close(_weights(tmp_path), single)


def test_two_ddp_processes_match_one_process(tmp_path, single):
    res = run_app(
        "train.py", [*_overrides(tmp_path), "trainer=ddp_cpu", f"hydra.run.dir={tmp_path}"]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_close(_weights(tmp_path), single)


@pytest.mark.slow
def test_two_nodes_with_accumulation_match_one_process(tmp_path, single):
    """2 nodes x 2 micro-batches of 4: 4 slices of the global batch of 16."""
    _assert_close(_weights(_two_nodes(tmp_path, ["data.batch_per_device=4"])), single)


def test_two_nodes_match_one_process(tmp_path, single):
    _assert_close(_weights(_two_nodes(tmp_path, [])), single)


def test_a_different_seed_gives_different_weights(tmp_path, single):
    """The tolerance is far below what a change of samples or noise does."""
    train(compose_train([*_overrides(tmp_path), "seed=1"], tmp_path))
    with pytest.raises(AssertionError):
        _assert_close(_weights(tmp_path), single)


def test_global_batch_not_divisible_by_world_size_is_a_config_error(tmp_path):
    cfg = compose_train([*_overrides(tmp_path), "trainer=ddp_cpu", "data.batch_size=15"], tmp_path)
    with pytest.raises(ConfigError, match=r"data.batch_size=15 .* world size 2"):
        train(cfg)


def test_sample_grid_runs_once_per_step_with_accumulation(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(SampleGrid, "_sample", lambda self, t, m: calls.append(t.global_step))
    overrides = [*_overrides(tmp_path), "data.batch_per_device=4"]
    train(compose_train([*overrides, "callbacks.sample_grid.every_n_steps=1"], tmp_path))
    assert calls == [1, 2, 3, 3]  # every step, then at the end


def test_setting_accumulate_grad_batches_is_a_config_error(tmp_path):
    cfg = compose_train([*_overrides(tmp_path), "+trainer.accumulate_grad_batches=2"], tmp_path)
    with pytest.raises(
        ConfigError, match="trainer.accumulate_grad_batches .* data.batch_per_device"
    ):
        train(cfg)
