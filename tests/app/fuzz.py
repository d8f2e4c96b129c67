"""Random config overrides and random bytes as images and checkpoints for the three apps.

A case is ``(app, args)``; an app run passes when it returns normally or exits with one
``error: ...`` message (never an exception from inside, never a hang)."""

from __future__ import annotations

import random
from pathlib import Path

COMMON = ["0", "-1", "abc", "''", "[]", "null", "[1,2]", "{a:1}", "2.5", "true", "' '"]
FLOATS = [*COMMON, "1e30", "-1e-3", "nan", "inf", "0.5", "1"]
INTS = [*COMMON, "1", "2", "3", "-3"]
WORDS = [*COMMON, "heun", "karras", "nope", "euler", "4"]

TRAIN_KEYS = {
    "optimizer.lr": FLOATS,
    "data.batch_size": INTS,
    "sampler.nfe": INTS,
    "schedule.sigma_min": FLOATS,
    "schedule.sigma_max": FLOATS,
    "lr_warmup_steps": INTS,
    "label_dim": INTS,
    "max_nonfinite_steps": INTS,
    "ema.decay": FLOATS,
    "seed": INTS,
    "dataset.resolution": INTS,
    "model.model_channels": INTS,
    "sampler.discretization": WORDS,
    "sampler.name": WORDS,
    "callbacks.model_checkpoint.keep_last": INTS,
    "trainer.gradient_clip_val": FLOATS,
}
SAMPLE_KEYS = {
    "n": INTS,
    "seeds": [*INTS, "0-3", "3-1", "[0-2,5]", "'1,2'", "a-b"],
    "batch_size": INTS,
    "sampler.nfe": INTS,
    "sampler.name": WORDS,
    "sampler.discretization": WORDS,
    "guidance": FLOATS,
    "class_label": INTS,
    "use_ema": WORDS,
}
EVALUATE_KEYS = {
    "eval.num_samples": INTS,
    "eval.batch_size": INTS,
    "eval.repeats": INTS,
    "sampler.nfe": INTS,
    "sampler.name": WORDS,
    "guidance": FLOATS,
    "eval.split": [*WORDS, "train", "test", "all"],
    "eval.metrics": [*WORDS, "[fid]", "[nope]"],
}
KEYS = {"train": TRAIN_KEYS, "sample": SAMPLE_KEYS, "evaluate": EVALUATE_KEYS}


def random_bytes_png_folder(folder: Path, rng: random.Random) -> Path:
    """A folder of files named *.png holding random bytes (some start with a PNG header)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(rng.randint(1, 3)):
        head = b"\x89PNG\r\n\x1a\n" if rng.random() < 0.5 else b""
        (folder / f"{i}.png").write_bytes(head + rng.randbytes(rng.randint(0, 600)))
    return folder


def random_bytes_ckpt(path: Path, rng: random.Random, valid: Path) -> Path:
    """Random bytes, or a valid checkpoint cut short or with bytes flipped."""
    data = valid.read_bytes()
    kind = rng.choice(["random", "truncated", "flipped"])
    if kind == "random":
        data = rng.randbytes(rng.randint(0, 2000))
    elif kind == "truncated":
        data = data[: rng.randint(0, len(data) - 1)]
    else:
        data = bytearray(data)
        for _ in range(20):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = bytes(data)
    path.write_bytes(data)
    return path


def cases(n: int, seed: int, tmp: Path, ckpt: Path) -> list[tuple[str, list[str]]]:
    """``n`` seeded cases: 1-2 random overrides each, a fifth of them with corrupt input files."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        app = rng.choice(sorted(KEYS))
        keys = rng.sample(sorted(KEYS[app]), rng.randint(1, 2))
        args = [f"{k}={rng.choice(KEYS[app][k])}" for k in keys]
        if rng.random() < 0.2:
            if app == "train":
                folder = random_bytes_png_folder(tmp / f"imgs{i}", rng)
                args += ["dataset=image_folder", f"dataset.path={folder}", "dataset.resolution=8"]
            else:
                args.append(f"ckpt={random_bytes_ckpt(tmp / f'{i}.ckpt', rng, ckpt)}")
        out.append((app, args))
    return out
