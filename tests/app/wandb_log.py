"""Read W&B runs back from their local log: ``<dir>/wandb/[offline-]run-*/run-<id>.wandb`` (written
online and offline) is a LevelDB-style log of protobuf ``Record`` messages: a 7-byte file header
(``:W&B``, magic, version), then 32 KiB blocks of chunks, each with a 7-byte header (CRC32, length,
type FULL / FIRST / MIDDLE / LAST). Test support: the tests read whole runs back to check what a
user sees; the apps never parse this private format (they read ``run.json``)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> Iterator[pb.Record]:
    """Every ``Record`` in one ``.wandb`` file, in order."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run log")
    chunks, pos = [], 7
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer too short for a header: zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero-filled tail of a block (or of the file)
            pos += left
            continue
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            yield record
            chunks = []


@dataclass
class OfflineRun:
    """What a run sent: identity, config, history rows, summary and file names."""

    path: Path
    id: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    project: str = ""
    entity: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    charts: dict[str, dict] = field(default_factory=dict)
    exit_code: int | None = None

    @property
    def dir(self) -> Path:
        return self.path.parent

    def table(self, key: str) -> list[dict]:
        """The rows of the last ``wandb.Table`` logged under ``key`` (read from the run's files)."""
        (row, *_) = [h for h in reversed(self.history) if h.get(f"{key}/_type") == "table-file"]
        table = json.loads((self.dir / "files" / row[f"{key}/path"]).read_text())
        return [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def _apply_config(config: dict, items, remove) -> None:
    for item in items:
        *parents, last = item.nested_key or [item.key]
        node = config
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = json.loads(item.value_json)
    for item in remove:
        config.pop(_key(item), None)


def read_run(path: Path) -> OfflineRun:
    """Parse one ``run-<id>.wandb`` into an ``OfflineRun``: config values unwrapped from W&B's
    ``{"value": ...}``, history rows as dicts of JSON values, and each custom chart's field
    settings (``{"x": "nfe", "y": "fid", "stroke": "sampler"}``) by its key."""
    run = OfflineRun(Path(path))
    config: dict = {}
    for rec in read_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.id, run.name, run.group, run.job_type = (
                r.run_id,
                r.display_name,
                r.run_group,
                r.job_type,
            )
            run.tags = list(r.tags)
            run.project, run.entity = r.project, r.entity
            _apply_config(config, r.config.update, r.config.remove)
        elif kind == "config":
            _apply_config(config, rec.config.update, rec.config.remove)
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            for item in rec.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
        elif kind == "files":
            run.files += [f.path for f in rec.files.files]
        elif kind == "exit":
            run.exit_code = rec.exit.exit_code
    visualize = config.get("_wandb", {}).get("visualize", {})
    run.charts = {k: v["panel_config"]["fieldSettings"] for k, v in visualize.items()}
    run.config = {
        k: v["value"] if isinstance(v, dict) and "value" in v else v
        for k, v in config.items()
        if k != "_wandb"
    }
    return run


def offline_runs(root: Path) -> list[OfflineRun]:
    """Every offline run under ``root`` (any depth), sorted by run directory."""
    return [read_run(p) for p in sorted(Path(root).rglob("offline-run-*/run-*.wandb"))]
