"""Result tables as CSV and markdown: evaluate.py's sweeps and dl-compare write them alike."""

from __future__ import annotations

import csv
from pathlib import Path


def cell(value: object) -> str:
    """A markdown cell: floats to 4 significant digits, missing values as ``-``."""
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_lines(columns: list[str], rows: list[dict]) -> list[str]:
    """The lines of a GitHub markdown table of ``rows`` (dicts) over ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    """``rows`` over ``columns`` as CSV; missing values as empty cells."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: "" if r[c] is None else r[c] for c in columns} for r in rows)


PROTOCOL_PREFIX = "protocol."
SPREAD = ("min", "mean", "std", "max")


def write_sweep_table(rows: list[dict], stem: Path) -> None:
    """``<stem>.csv`` (every column, the ``protocol.*`` record included) and a Markdown
    ``<stem>.md`` of a sweep: per-run metrics, FID's min / mean / std / max over seed blocks when
    repeated, the protocol columns that differ between rows, and below the table those that
    do not."""
    write_csv(stem.with_suffix(".csv"), list(rows[0]), rows)
    spread = {f"{k}_{s}" for k in rows[0] for s in SPREAD if f"{k}_min" in rows[0]}
    protocol = [k for k in rows[0] if k.startswith(PROTOCOL_PREFIX)]
    varying = [k for k in protocol if len({str(r.get(k)) for r in rows}) > 1]
    keys = [
        k
        for k in rows[0]
        if (k not in spread or k.startswith("fid_"))
        and (not k.startswith(PROTOCOL_PREFIX) or k in varying)
    ]
    lines = markdown_lines(keys, rows)
    fixed = [k for k in protocol if k not in varying]
    if fixed:
        lines += [
            "",
            "Protocol: " + "; ".join(f"{k[len(PROTOCOL_PREFIX) :]}={rows[0][k]}" for k in fixed),
        ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
