"""Shared pieces of the benchmarks: the machine they ran on, composing the training config,
timing, and writing results as JSON plus a markdown table."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from diffusionlab.config import CONF_DIR

RESULTS = Path(__file__).resolve().parent / "results"


def machine(device: str = "cpu") -> dict:
    """CPU model, core count, torch version and (on CUDA) the GPU name."""
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")),
            cpu,
        )
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def compose_train(overrides: Sequence[str], output_dir: Path) -> DictConfig:
    """``conf/train.yaml`` with ``overrides``, its run directory set to ``output_dir``."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels (CUDA) so wall-clock timings are honest."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device | str) -> float:
    """Seconds one call of ``fn`` takes, synchronised on ``device``."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats printed with 3 significant digits (ratios 3 decimals)."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, out: Path | None, payload: dict, table: str) -> Path:
    """Print ``table`` and write ``<out>/<name>.json`` and ``<out>/<name>.md``."""
    out = Path(out) if out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    payload = {"bench": name, "argv": sys.argv[1:], **payload}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    m = payload.get("machine", {})
    where = (
        f"{m.get('gpu') or m.get('cpu')} ({m.get('cpu_cores')} CPU cores), torch {m.get('torch')}"
    )
    (out / f"{name}.md").write_text(f"# {name}\n\n{where}\n\n{table}\n")
    print(table)
    print(f"\nwrote {out / name}.json and .md")
    return out / f"{name}.json"
