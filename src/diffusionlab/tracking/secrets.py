"""Keep secrets out of everything a run writes: the W&B API key and any value whose config key or
environment variable is named like a key, token, password or secret."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SECRET_NAME = re.compile(
    r"(?i)(^|[_.\-])(api[_\-]?key|access[_\-]?key|secret|secret[_\-]?key|password|passwd|token)$"
)
REDACTED = "<redacted>"
MIN_LENGTH = 4  # shorter values are not worth hunting for in every string


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(str(name)))


def secret_values(config: Any = None, environ: Mapping[str, str] | None = None) -> set[str]:
    """Values of secret-named environment variables (``WANDB_API_KEY``, ``HF_TOKEN``, ...) and of
    secret-named keys anywhere in ``config`` (a plain container)."""
    env = os.environ if environ is None else environ
    found = {v for k, v in env.items() if is_secret_name(k)}

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                if is_secret_name(k) and isinstance(v, str | int) and not isinstance(v, bool):
                    found.add(str(v))
                walk(v)
        elif isinstance(node, list | tuple):
            for v in node:
                walk(v)

    walk(config)
    return {v for v in found if len(v) >= MIN_LENGTH}


def redact(node: Any, secrets: set[str]) -> Any:
    """A copy of a plain container with secret-named keys and every secret value redacted."""
    if isinstance(node, Mapping):
        return {
            k: REDACTED if is_secret_name(k) and v is not None else redact(v, secrets)
            for k, v in node.items()
        }
    if isinstance(node, list | tuple):
        return type(node)(redact(v, secrets) for v in node)
    if isinstance(node, str):
        return redact_text(node, secrets)
    return node


def redact_text(text: str, secrets: set[str]) -> str:
    for s in sorted(secrets, key=len, reverse=True):
        text = text.replace(s, REDACTED)
    return text


def redact_files(folder: Path, secrets: set[str]) -> None:
    """Rewrite the text files in ``folder`` (Hydra's ``.hydra/``) without the secrets."""
    if not secrets or not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_file():
            text = path.read_text(errors="ignore")
            clean = redact_text(text, secrets)
            if clean != text:
                path.write_text(clean)


@contextmanager
def redacted_argv(secrets: set[str]) -> Iterator[None]:
    """``sys.argv`` without the secrets while loggers start (W&B records the command line)."""
    saved = sys.argv
    sys.argv = [redact_text(a, secrets) for a in saved]
    try:
        yield
    finally:
        sys.argv = saved


@contextmanager
def secrets_kept_out(config: Any, output_dir: str | Path) -> Iterator[set[str]]:
    """While loggers start for a run of ``config`` (a plain container): Hydra's saved
    ``<output_dir>/.hydra/`` files are rewritten without the secrets and ``sys.argv`` hides them;
    yields the secret values, for :func:`redact`."""
    secrets = secret_values(config)
    redact_files(Path(output_dir) / ".hydra", secrets)
    with redacted_argv(secrets):
        yield secrets
