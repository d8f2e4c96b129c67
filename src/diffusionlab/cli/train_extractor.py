"""``dl-train-extractor dataset=mnist resolution=16 cache_dir=.cache steps=300``: train the domain
feature extractor of an embedded dataset and store it in the cache, where the evaluator (which
otherwise trains it on first use) finds it."""

from __future__ import annotations

import argparse
import logging
from functools import partial

from diffusionlab.cli.common import run_cli
from diffusionlab.errors import ConfigError
from diffusionlab.evaluation.reference import load_dataset
from diffusionlab.evaluation.train_extractor import train_and_save

DEFAULTS = {"dataset": "mnist", "resolution": "16", "cache_dir": ".cache", "steps": "300"}


def train_extractor(overrides: list[str]) -> None:
    """Train and store the extractor for ``key=value`` overrides of :data:`DEFAULTS`."""
    args = dict(DEFAULTS)
    for kv in overrides:
        key, eq, value = kv.partition("=")
        if not eq or key not in DEFAULTS:
            raise ConfigError(f"cannot read {kv!r}: pass key=value with keys {', '.join(DEFAULTS)}")
        args[key] = value
    try:
        resolution, steps = int(args["resolution"]), int(args["steps"])
    except ValueError:
        raise ConfigError(f"resolution and steps must be integers, got {args}") from None
    data = load_dataset(args["dataset"], resolution)
    path, acc = train_and_save(data, args["dataset"], args["cache_dir"], steps)
    print(f"saved {path} (test accuracy {acc:.4f})")


def main(argv: list[str] | None = None) -> None:
    """``dl-train-extractor``: user errors end as one ``error: ...`` line, as in the other apps."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "overrides", nargs="*", help=" ".join(f"{k}={v}" for k, v in DEFAULTS.items())
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_cli(partial(train_extractor, parser.parse_args(argv).overrides))


if __name__ == "__main__":
    main()
