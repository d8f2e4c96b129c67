"""The recorded FID protocol: the record's round trips (dict, metric row, CSV), the seed-block
text, the spread over repeated blocks and the sweep tables' protocol columns."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from diffusionlab.evaluation.protocol import (
    Protocol,
    interval_text,
    sampling_fields,
    seed_ranges,
    seeds_text,
    summarize,
)
from diffusionlab.evaluation.tables import write_csv, write_sweep_table
from diffusionlab.sampling.spec import SamplerSpec

RECORD = Protocol(
    dataset="mnist",
    split="train",
    reference="/c/ref-mnist-train-16-dl-domain.pt",
    reference_sha256="ab" * 32,
    extractor="dl-domain-v2-mnist-16",
    extractor_weights="/c/extractors/mnist-16.pt",
    extractor_sha256="cd" * 32,
    num_samples=2000,
    repeats=3,
    seeds=seeds_text(seed_ranges(2000, 3)),
    ckpt="runs/a/last.ckpt",
    **sampling_fields(SamplerSpec(name="heun", nfe=17, options={"s_churn": 0.5})),
    guidance=2.0,
    guidance_interval=interval_text((0.28, 5.42)),
    ema="ema_decay=0.999",
    class_sampling="uniform per seed (per_seed generator), 10 classes",
)


def test_record_round_trips_through_dict_json_row_and_csv(tmp_path):
    assert Protocol.from_dict(json.loads(json.dumps(RECORD.to_dict()))) == RECORD
    row = {"fid": 3.25, **RECORD.row()}
    assert Protocol.from_row(row) == RECORD
    write_csv(tmp_path / "m.csv", list(row), [row])
    with open(tmp_path / "m.csv") as f:
        (back,) = list(csv.DictReader(f))
    assert Protocol.from_row(back) == RECORD  # ints and floats converted back from text
    assert float(back["fid"]) == 3.25
    assert RECORD.sampler_options == '{"s_churn": 0.5}' and RECORD.nfe == 17
    with pytest.raises(ValueError, match="lacks"):
        Protocol.from_dict({"dataset": "mnist"})


def test_seed_blocks_as_text():
    assert seeds_text(seed_ranges(2000, 3)) == "0-1999,2000-3999,4000-5999"
    assert seeds_text([range(5, 6)]) == "5"
    assert seeds_text([[3, 1, 2]]) == "3,1,2"
    assert interval_text(None) == "" and interval_text([0.3, float("inf")]) == "0.3,inf"


def test_repeats_give_min_mean_std_max_over_disjoint_blocks():
    runs = [{"fid": 3.0}, {"fid": 4.0}, {"fid": 8.0}]
    out = summarize(runs)
    assert out["fid"] == 3.0 and out["fid_min"] == 3.0 and out["fid_max"] == 8.0
    assert out["fid_mean"] == pytest.approx(5.0)
    assert out["fid_std"] == pytest.approx(np.std([3, 4, 8], ddof=1))
    assert summarize(runs[:1]) == {"fid": 3.0}
    blocks = seed_ranges(100, 3, first_seed=7)
    assert [(b[0], b[-1]) for b in blocks] == [(7, 106), (107, 206), (207, 306)]


def test_sweep_table_lists_varying_protocol_columns_and_states_the_rest(tmp_path):
    rows = [
        {
            "nfe": n,
            "fid": f,
            **RECORD.with_sampling(SamplerSpec(name="heun", nfe=n), 2.0, None).row(),
        }
        for n, f in ((9, 5.0), (17, 3.0))
    ]
    write_sweep_table(rows, tmp_path / "nfe_sweep")
    md = (tmp_path / "nfe_sweep.md").read_text()
    header = md.splitlines()[0]
    assert "protocol.nfe" in header and "protocol.reference" not in header
    assert "Protocol: dataset=mnist; split=train;" in md and "guidance_interval=;" in md
    with open(tmp_path / "nfe_sweep.csv") as f:
        back = list(csv.DictReader(f))
    assert [Protocol.from_row(r).nfe for r in back] == [9, 17]
    assert Protocol.from_row(back[0]).sampler_options == "{}"  # the sweep's own spec
