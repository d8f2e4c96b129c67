"""Data loading at scale: the lazy ``dataset=zip`` against today's in-memory ``image_folder`` and
NVlabs/edm's ``ImageFolderDataset``, on the same synthetic 64x64 RGB images.

    python bench/data.py [--images 100000] [--work /tmp/dl-bench-data] [--edm-path /path/to/edm]
        [--baseline-images 10000] [--quick]

The dataset is made by ``dl-dataset convert`` (a source zip of 72x72 PNGs -> ``data.zip`` at 64x64
with ``transform=center-crop``, and the first ``--baseline-images`` of them as a folder for
``image_folder``). For each loader, in fresh processes: start-up (dataset built + first batch
with no workers), peak memory (PSS from /proc/<pid>/smaps_rollup, the process plus its DataLoader
workers, sampled every 20 ms) with 1 and 2 DDP processes (gloo) reading 2-worker loaders, and
loader images/s (float [-1, 1] batches ready for the model) with 0 and 2 workers, all loaders in
one process, interleaved round by round (the machine's load changes hit them alike).

``image_folder`` decodes every image into one float32 tensor at start-up; it runs on
``--baseline-images`` images (100,000 would need about 17 GB per process here: uint8 arrays,
the float copy and its transients), and its start-up and memory are also given scaled linearly
to the full count, marked as such. EDM is given its training loop's loader: its
``InfiniteSampler``, ``images / 127.5 - 1`` after loading (pyspng, if installed, is used by EDM
only). Skipped without ``--edm-path``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from benchlib import machine, markdown_table, write_results

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 64


# ----------------------------------------------------------------------------- the data
def _source_png(i: int) -> bytes:
    """A synthetic 72x72 RGB image: a smooth colour field plus noise, seeded by ``i``."""
    from PIL import Image

    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:72, 0:72] / 72.0
    base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in rng.uniform(0, 6, 3)], -1)
    img = (127.5 + 90 * base + rng.normal(0, 20, (72, 72, 3))).clip(0, 255).astype(np.uint8)
    bits = io.BytesIO()
    Image.fromarray(img).save(bits, format="png", compress_level=1)
    return bits.getvalue()


def make_data(work: Path, n: int, baseline: int) -> dict:
    """``work/source.zip`` (n images, 72x72), then dl-dataset convert to ``data.zip`` and a
    folder of the first ``baseline`` images; reused when already there."""
    work.mkdir(parents=True, exist_ok=True)
    timings = {}
    src = work / f"source-{n}.zip"
    if not src.is_file():
        t = time.perf_counter()
        with zipfile.ZipFile(src.with_suffix(".tmp"), "w") as z, multiprocessing.Pool(2) as pool:
            for i, data in enumerate(pool.imap(_source_png, range(n), chunksize=256)):
                z.writestr(f"{i // 1000:05d}/src{i:08d}.png", data)
        src.with_suffix(".tmp").replace(src)
        timings["source_s"] = time.perf_counter() - t
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for dest, extra in ((work / f"data-{n}.zip", []), (work / f"folder-{baseline}", ["format=folder", f"max_images={baseline}"])):  # fmt: skip
        if dest.exists():
            continue
        t = time.perf_counter()
        cmd = [sys.executable, "-m", "diffusionlab.cli.dataset", "convert", f"source={src}"]
        cmd += [f"dest={dest}", f"resolution={RESOLUTION}", "transform=center-crop"]
        cmd += ["num_workers=2", "progress=false", *extra]
        subprocess.run(cmd, check=True, env=env, cwd=work)
        timings[f"convert_{dest.name}_s"] = time.perf_counter() - t
    return timings


# ----------------------------------------------------------------------------- memory
def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


class PeakPss:
    """Peak PSS (kB) of this process plus its children, sampled in a thread."""

    def __init__(self, every: float = 0.02) -> None:
        self.peak, self.every, self._stop = 0, every, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            self.sample(me)
            time.sleep(self.every)

    def sample(self, me: int | None = None) -> int:
        me = me or os.getpid()
        now = pss_kb(me) + sum(pss_kb(c) for c in children(me))
        self.peak = max(self.peak, now)
        return now

    def __enter__(self) -> PeakPss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# ----------------------------------------------------------------------------- loaders
def preload(kind: str, edm: str | None) -> None:
    """Import what the loader needs, so that start-up and memory measure the data, not imports."""
    import torch

    if kind == "edm":
        sys.path.insert(0, edm)
        if "__init__" not in vars(torch.utils.data.Sampler):
            # EDM's InfiniteSampler calls Sampler.__init__(dataset), an argument newer torch dropped
            torch.utils.data.Sampler.__init__ = lambda self, *a, **k: None
        import torch_utils.misc  # noqa: F401
        import training.dataset  # noqa: F401
    else:
        import diffusionlab.data.datamodule  # noqa: F401
        import diffusionlab.data.datasets  # noqa: F401
        import diffusionlab.data.image_archive  # noqa: F401


def build(kind: str, path: str, workers: int, batch: int, world: int, rank: int, edm: str | None):
    """(seconds to build the dataset, an iterator of float [-1, 1] batches)."""
    import torch

    preload(kind, edm)
    t = time.perf_counter()
    if kind == "edm":
        from torch_utils.misc import InfiniteSampler
        from training.dataset import ImageFolderDataset

        ds = ImageFolderDataset(path, use_labels=True)
        # EDM opens the zip while building; forked workers would share that file (and its read
        # position) and fail CRC checks with more than one worker: close it, each opens its own
        ds.close()
        built = time.perf_counter() - t
        sampler = InfiniteSampler(ds, rank=rank, num_replicas=world, seed=0)
        kw = {"num_workers": workers, "prefetch_factor": 2 if workers else None}
        loader = torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=batch, **kw)

        def batches():
            for images, labels in loader:
                yield images.to(torch.float32) / 127.5 - 1, labels

        return built, batches()
    from diffusionlab.data import DiffusionDataModule, image_folder
    from diffusionlab.data.image_archive import ImageArchive

    if kind == "zip":
        ds = ImageArchive(path)
    else:
        ds = image_folder(path, resolution=RESOLUTION, channels=3)
    built = time.perf_counter() - t
    dm = DiffusionDataModule(ds, batch_size=batch * world, num_workers=workers, seed=0)
    dm.trainer = SimpleNamespace(
        world_size=world,
        global_rank=rank,
        global_step=0,
        num_devices=world,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
    )
    loader = dm.train_dataloader()
    return built, (dm.finish(b) for b in loader)


def run_startup(args: argparse.Namespace) -> dict:
    preload(args.kind, args.edm_path)
    start = time.perf_counter()
    built, batches = build(args.kind, args.path, 0, args.batch, 1, 0, args.edm_path)
    x, *_ = next(batches)
    assert x.shape == (args.batch, 3, RESOLUTION, RESOLUTION) and x.dtype.is_floating_point
    return {
        "build_s": built,
        "startup_s": time.perf_counter() - start,
        "pss_mb": pss_kb(os.getpid()) / 1024,
    }


def run_throughput(args: argparse.Namespace) -> dict:
    """Every loader in this one process, interleaved: ``--rounds`` rounds of ``--batches``
    batches each, the loaders in turn, so a change in the machine's load hits them alike;
    the median round per loader."""
    loaders = json.loads(args.loaders)
    for kind in loaders:
        preload(kind, args.edm_path)
    its = {
        kind: build(kind, path, args.workers, args.batch, 1, 0, args.edm_path)[1]
        for kind, path in loaders.items()
    }
    for it in its.values():
        for _ in range(args.warmup):
            next(it)
    rounds: dict[str, list[float]] = {kind: [] for kind in its}
    for _ in range(args.rounds):
        for kind, it in its.items():
            t = time.perf_counter()
            for _ in range(args.batches):
                next(it)
            rounds[kind].append(args.batch * args.batches / (time.perf_counter() - t))
    return {kind: {"images_per_s": float(np.median(r)), "rounds": r} for kind, r in rounds.items()}


def _ddp_rank(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    # DataLoader workers fork, as in a rank that trainer=ddp launches (a spawned rank's default
    # would spawn them: each a fresh interpreter importing torch again)
    multiprocessing.set_start_method("fork", force=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.world)  # fmt: skip
    preload(args.kind, args.edm_path)
    with PeakPss() as peak:
        before = peak.sample()
        _, batches = build(args.kind, args.path, 2, args.batch, args.world, rank, args.edm_path)
        for _ in range(args.batches):
            next(batches)
        dist.barrier()
    Path(out, f"{rank}.json").write_text(json.dumps({"peak_mb": peak.peak / 1024,
                                                     "before_mb": before / 1024}))  # fmt: skip
    dist.destroy_process_group()


def run_ddp(args: argparse.Namespace) -> dict:
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_ddp_rank, args=(args, port, out), nprocs=args.world, join=True)
        ranks = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(args.world)]
    return {
        "peak_pss_mb": max(r["peak_mb"] for r in ranks),
        "data_pss_mb": max(r["peak_mb"] - r["before_mb"] for r in ranks),
    }


def measure(kind: str, path: Path, mode: str, args: argparse.Namespace, **extra) -> dict:
    """One measurement in a fresh process (nothing cached from another loader)."""
    cmd = [sys.executable, __file__, "--one", mode, "--kind", kind, "--path", str(path)]
    cmd += ["--batch", str(args.batch), "--batches", str(args.batches)]
    cmd += ["--warmup", str(args.warmup)]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    if args.edm_path:
        cmd += ["--edm-path", str(args.edm_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode:
        raise RuntimeError(f"{kind} {mode} failed:\n{res.stderr[-3000:]}")
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))
    out = json.loads(line[7:])
    print(f"{kind:12s} {mode:10s} {extra or ''} {out}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--baseline-images", type=int, default=10_000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dl-bench-data"))
    ap.add_argument("--edm-path", type=str, default=None, help="a checkout of NVlabs/edm")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=10, help="batches per timed round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per loader")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smoke mode: 600 images, small batches")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--one", choices=["startup", "throughput", "ddp"], help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--loaders", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        run = {"startup": run_startup, "throughput": run_throughput, "ddp": run_ddp}[args.one]
        print("RESULT " + json.dumps(run(args)), flush=True)
        return
    if args.quick:
        args.images, args.baseline_images, args.batch, args.batches, args.warmup = (
            600,
            300,
            32,
            4,
            1,
        )
    edm_ok = args.edm_path and Path(args.edm_path, "training", "dataset.py").is_file()
    timings = make_data(args.work, args.images, args.baseline_images)
    n, nb = args.images, args.baseline_images
    loaders = [("zip", args.work / f"data-{n}.zip", n)]
    loaders.append(("image_folder", args.work / f"folder-{nb}", nb))
    if edm_ok:
        loaders.append(("edm", args.work / f"data-{n}.zip", n))
    results = {}
    for kind, path, count in loaders:
        r = {"images": count, **measure(kind, path, "startup", args)}
        for world in (1, 2):
            r[f"ddp{world}"] = measure(kind, path, "ddp", args, world=world)
        results[kind] = r
    paths = json.dumps({kind: str(path) for kind, path, _ in loaders})
    for workers in (0, 2):
        out = measure("all", Path("."), "throughput", args, workers=workers, loaders=paths,
                      rounds=args.rounds)  # fmt: skip
        for kind, r in out.items():
            results[kind][f"workers{workers}"] = r
    float_mb = n * 3 * RESOLUTION * RESOLUTION * 4 / 2**20
    scale = n / nb  # image_folder's start-up and memory grow linearly with the images
    rows = []
    for kind, r in results.items():
        k = scale if kind == "image_folder" else 1.0
        rows.append([
            kind + (f" ({r['images']:,} img measured, x{k:g})" if k != 1 else f" ({r['images']:,} img)"),
            r["startup_s"] * k,
            r["ddp1"]["peak_pss_mb"],
            r["ddp2"]["peak_pss_mb"],
            r["ddp1"]["data_pss_mb"] * k,
            r["ddp2"]["data_pss_mb"] * k,
            r["workers0"]["images_per_s"],
            r["workers2"]["images_per_s"],
        ])  # fmt: skip
    header = ["loader", "start-up s", "peak PSS MB (1 proc)", "peak PSS MB (2 procs, each)",
              "data PSS MB (1 proc)", "data PSS MB (2 procs, each)", "img/s 0 workers",
              "img/s 2 workers"]  # fmt: skip
    zipr = results["zip"]
    payload = {
        "machine": machine(),
        "images": n,
        "baseline_images": nb,
        "float_copy_mb": float_mb,
        "data_timings_s": timings,
        "results": results,
        "edm": bool(edm_ok),
        "targets": {
            "startup_below_5s": zipr["startup_s"] < 5,
            "pss_below_tenth_of_float_copy": max(
                zipr["ddp1"]["peak_pss_mb"], zipr["ddp2"]["peak_pss_mb"]
            )
            < float_mb / 10,
            "data_pss_below_tenth_of_float_copy": max(
                zipr["ddp1"]["data_pss_mb"], zipr["ddp2"]["data_pss_mb"]
            )
            < float_mb / 10,
            "throughput_at_least_edm": None
            if not edm_ok
            else all(
                zipr[w]["images_per_s"] >= results["edm"][w]["images_per_s"]
                for w in ("workers0", "workers2")
            ),
        },  # fmt: skip
    }
    if edm_ok:
        payload["ratio_to_edm"] = {
            w: zipr[w]["images_per_s"] / results["edm"][w]["images_per_s"]
            for w in ("workers0", "workers2")
        }
    note = (
        f"\n\nfloat32 copy of the {n:,} images: {float_mb:,.0f} MB per process. "
        "Peak PSS: the rank process plus its 2 DataLoader workers, Python, torch and the loader's "
        "libraries included; data PSS: its growth from before the dataset was built. "
        "image_folder: start-up and data PSS scaled linearly from its measured size."
    )
    write_results("data", args.out, payload, markdown_table(header, rows) + note)


if __name__ == "__main__":
    main()
