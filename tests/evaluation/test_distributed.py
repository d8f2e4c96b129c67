"""FID over two gloo processes equals FID in one process on the same seeds."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

from .dist_worker import NUM_SAMPLES, evaluate, worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_fid_of_one(domain, reference, cache_dir, tmp_path, monkeypatch):
    from diffusionlab.evaluation.reference import reference_path

    name, weights, _ = domain
    ref_file = reference_path(cache_dir, "mnist", "train", 16, name)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    mp.spawn(
        worker,
        args=(2, _free_port(), str(weights), str(ref_file), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    two = json.loads((tmp_path / "metrics.json").read_text())
    feats_two = torch.load(tmp_path / "features.pt", weights_only=True)
    feats_one, one = evaluate(str(weights), str(ref_file), batch_size=NUM_SAMPLES)
    for k in feats_one:
        assert feats_two[k].shape == feats_one[k].shape == (NUM_SAMPLES, feats_one[k].shape[1])
        torch.testing.assert_close(feats_two[k], feats_one[k], atol=1e-4, rtol=1e-4)
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-4)
    assert two["kid_mean"] == pytest.approx(one["kid_mean"], rel=1e-3, abs=1e-6)
    assert two["precision"] == one["precision"] and two["recall"] == one["recall"]
