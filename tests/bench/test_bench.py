"""Smoke runs of every benchmark in its smallest mode: JSON + markdown written, numbers sane."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["dataset=digits", "model=unet_tiny", "data.batch_size=16"]


def run_bench(name: str, *args: str, timeout: float = 300) -> dict:
    out = Path(os.environ["BENCH_OUT"])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{name}.py"), *args, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stem = {"edm_compare": "edm_compare"}.get(name, name)
    table = (out / f"{stem}.md").read_text()
    assert table.startswith(f"# {stem}") and "CPU cores" in table
    return json.loads((out / f"{stem}.json").read_text())


@pytest.fixture(autouse=True)
def bench_out(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_OUT", str(tmp_path))


def test_overhead_smoke():
    res = run_bench("overhead", "--steps", "3", "--warmup", "2", "--rounds", "1", *TINY)
    best = res["best_per_step"]
    assert set(best) == {"bare", "lightning", "lightning-bare"} and res["clock"] == "process"
    assert all(v > 0 and math.isfinite(v) for v in best.values())
    assert res["ratio"] == pytest.approx(best["lightning"] / best["bare"])
    # one round: the best step durations are that round's, so both images/s agree
    assert best["bare"] == pytest.approx(res["images_per_s"]["bare"][0])


def test_host_overhead_smoke_counts_random_number_calls():
    """docs/performance.md: python bench/host_overhead.py (smoke mode). The framework step
    calls no torch random-number operator and as many operators at batch 8 as at 16; the bare
    step's two ``torch.randn`` are two."""
    res = run_bench("host_overhead", "--quick")
    counts = res["counts"]
    assert set(counts) == {"bare", "framework", "framework + augment"}
    assert counts["bare"]["8"]["rng_calls"] == counts["bare"]["16"]["rng_calls"] == 2
    for side in ("framework", "framework + augment"):
        assert counts[side]["8"] == counts[side]["16"] and counts[side]["8"]["rng_calls"] == 0
    assert all(v > 0 for v in res["best_host_ms"].values())
    assert res["extra_host_ms"]["bare"] == 0


def test_throughput_smoke_counts_the_known_flops():
    args = ["--threads", "1", "--models", "unet_tiny", "--resolution", "16", "--channels", "1"]
    args += ["--batch", "64"]
    res = run_bench("throughput", *args, "--steps", "1", "--warmup", "0")
    (row_fp32, row_bf16) = res["rows"]
    assert (row_fp32["precision"], row_bf16["precision"]) == ("32-true", "bf16-mixed")
    # unet_tiny at 16x16: 59 MFLOP forward per image, backward about twice that
    assert 0.15 < row_fp32["gflop_per_image"] < 0.2
    assert row_fp32["params_M"] == pytest.approx(0.70, abs=0.03)
    assert row_fp32["mfu"] is None and row_fp32["peak_memory_mb"] > 100


def test_sampling_smoke_generate_equals_bare_heun():
    res = run_bench("sampling", "--threads", "1", "--nfe", "5", "--batch", "4", "--rounds", "1")
    assert res["max_abs_diff"] == 0.0  # same grid, same noise, same Heun steps
    assert res["ratio"] > 0


@pytest.mark.slow
def test_throughput_smoke_unet_ddpmpp():
    """docs/performance.md: bench/throughput.py --threads 1 --models unet_ddpmpp --batch 4"""
    args = ["--threads", "1", "--models", "unet_ddpmpp", "--batch", "1", "--precisions", "32-true"]
    res = run_bench("throughput", *args, "--steps", "1", "--warmup", "0", timeout=900)
    assert res["rows"][0]["params_M"] == pytest.approx(55.732739)


@pytest.mark.slow
def test_throughput_smoke_compiled():
    """docs/performance.md: bench/throughput.py ... --precisions 32-true bf16-mixed --compile"""
    args = ["--threads", "1", "--models", "unet_tiny", "--resolution", "16", "--channels", "1"]
    args += ["--batch", "64", "--precisions", "32-true", "bf16-mixed", "--compile"]
    res = run_bench("throughput", *args, "--steps", "1", "--warmup", "1", timeout=1200)
    compiled = [r for r in res["rows"] if r["compile"]]
    assert [r["precision"] for r in compiled] == ["bf16-mixed"] and compiled[0]["images_per_s"] > 0


def test_edm_compare_skips_without_a_checkout():
    res = run_bench("edm_compare", "--quick")
    assert res["skipped"] is True


@pytest.mark.slow
def test_edm_compare_against_a_checkout():
    """Needs DL_EDM_PATH pointing at a checkout of github.com/NVlabs/edm."""
    edm = os.environ.get("DL_EDM_PATH")
    if not edm:
        pytest.skip("DL_EDM_PATH not set")
    res = run_bench("edm_compare", "--threads", "1", "--quick", "--edm-path", edm, timeout=900)
    edm_row, ours = res["rows"][0], res["rows"][1]
    assert edm_row["params_M"] == pytest.approx(ours["params_M"], abs=1e-6)  # same network
    assert edm_row["gflop_per_image"] == pytest.approx(ours["gflop_per_image"], rel=1e-3)


@pytest.mark.slow
def test_ddp_smoke():
    res = run_bench("ddp", "--quick", *TINY, timeout=600)
    assert set(res["images_per_s"]) == {"1", "2"} and res["ratio"] > 0


@pytest.mark.slow
def test_sample_processes_smoke():
    """docs/scaling.md's python bench/sample_processes.py with fewer images: sample.py under
    torchrun with 1 and 2 processes, the same images for the same threads per process."""
    args = ["--nfe", "4", "--num", "8", "--batch", "4", "--rounds", "1"]
    res = run_bench("sample_processes", *args, timeout=600)
    cores = os.cpu_count() or 1
    runs = {f"1x{cores}", "1x1", f"2x{max(1, cores // 2)}"}
    assert set(res["images_per_s"]) == runs and res["ratio"] > 0
    assert all(v[0] > 0 for v in res["images_per_s"].values())
    assert res["max_pixel_difference_across_thread_counts"] <= 2


def test_learned_grids_smoke_beats_the_grid_it_started_from():
    args = ["--nfe", "5", "--samplers", "dpmpp_2m", "--targets", "gaussian16"]
    res = run_bench("learned_grids", *args, "--steps", "15", "--n-fit", "16", "--n-test", "64")
    (row,) = res["results"]
    (learned,) = row["learned"]
    assert (row["target"], row["nfe"], learned["sampler"]) == ("gaussian16", 5, "dpmpp_2m")
    # 9 of our samplers x 3 hand-made grids (k-diffusion's too when installed)
    assert len([r for r in row["hand_made"] if r["who"] == "ours"]) == 27
    start = next(r for r in row["hand_made"] if (r["sampler"], r["grid"]) == ("dpmpp_2m", "karras"))
    assert (
        learned["error"] < start["error"] and learned["heldout_after"] <= learned["heldout_before"]
    )
    assert row["ratio"] == pytest.approx(learned["error"] / row["best_hand_made"]["error"])


@pytest.mark.slow
def test_data_smoke(tmp_path):
    """bench/data.py --quick: 600 images made by dl-dataset convert, every loader measured."""
    args = ["--quick", "--work", str(tmp_path / "work")]
    if os.environ.get("DL_EDM_PATH"):
        args += ["--edm-path", os.environ["DL_EDM_PATH"]]
    res = run_bench("data", *args, timeout=1800)
    zip_row = res["results"]["zip"]
    assert res["images"] == 600 and zip_row["images"] == 600
    assert zip_row["startup_s"] > 0 and zip_row["ddp2"]["peak_pss_mb"] > 0
    assert all(zip_row[w]["images_per_s"] > 0 for w in ("workers0", "workers2"))
    assert res["results"]["image_folder"]["images"] == 300
