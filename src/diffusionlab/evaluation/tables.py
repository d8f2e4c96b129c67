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


def write_sweep_table(rows: list[dict], stem: Path) -> None:
    """``<stem>.csv`` and a Markdown ``<stem>.md`` of a sweep (per-run metrics, plus FID's min /
    mean / max over seed ranges when repeated)."""
    write_csv(stem.with_suffix(".csv"), list(rows[0]), rows)
    spread = {f"{k}_{s}" for k in rows[0] for s in ("min", "mean", "max") if f"{k}_min" in rows[0]}
    keys = [k for k in rows[0] if k not in spread or k.startswith("fid_")]
    stem.with_suffix(".md").write_text("\n".join(markdown_lines(keys, rows)) + "\n")
