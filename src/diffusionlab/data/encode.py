"""``dl-dataset encode``: images -> VAE latent statistics, stored as EDM2 stores them.

Each image becomes ``NNNNN/img-mean-std-NNNNNNNN.npy``: float32 ``[2C, h, w]``, the posterior's
mean and standard deviation stacked on the channel axis (EDM2 ``dataset_tool.py encode``), with
the labels in ``dataset.json``. Training (``dataset=latents``) draws one latent per sample from
them. ``dataset.json`` also holds, under ``"diffusionlab"``, the VAE that encoded them (kind,
path, SHA-256 of its weights, pixel range), the image shape and the per-channel mean and standard
deviation of the raw latents ``mean + std * n`` over the whole set (exact, from sums:
``E[z] = E[mean]``, ``Var[z] = Var[mean] + E[std^2]``), which set the normalisation.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from diffusionlab.data.archive import CorruptFile
from diffusionlab.data.convert import FolderWriter, ZipWriter, archive_name, open_source
from diffusionlab.errors import ConfigError
from diffusionlab.networks.autoencoder import load_vae

log = logging.getLogger(__name__)

LATENT_STEM = "img-mean-std-"
METADATA_KEY = "diffusionlab"

_JOB: dict = {}


def _load(i: int) -> tuple[int, np.ndarray | None, str | None]:
    try:
        return i, _JOB["source"].image(i, _JOB["mode"]), None
    except CorruptFile as e:
        return i, None, str(e)


def _images(n: int, num_workers: int) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    if num_workers <= 1 or n < 64:
        yield from map(_load, range(n))
        return
    with multiprocessing.get_context("fork").Pool(num_workers) as pool:
        yield from pool.imap(_load, range(n), chunksize=16)


def npy_bytes(array: np.ndarray) -> bytes:
    f = io.BytesIO()
    np.save(f, array)
    return f.getvalue()


def encode(
    source: str,
    dest: str,
    vae: str,
    batch_size: int = 32,
    device: str = "cpu",
    pixel_range: list[float] | None = None,
    max_images: int | None = None,
    skip_corrupt: bool = False,
    num_workers: int = 0,
    progress: bool = True,
) -> dict:
    """Encode the images of ``source`` (a dataset zip or folder) with the VAE ``vae`` (our
    autoencoder file or a diffusers folder) into ``dest`` (``.zip`` or a folder)."""
    from tqdm import tqdm

    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    model = load_vae(vae, "vae", pixel_range)
    try:
        model.model.to(device)
    except (RuntimeError, AssertionError) as e:
        raise ConfigError(f"device={device!r} is not available ({e})") from None
    src = open_source(source)
    labels = src.labels()
    n = len(src) if max_images is None else min(len(src), int(max_images))
    dest_path = Path(dest).expanduser()
    writer = ZipWriter(dest_path) if dest_path.suffix.lower() == ".zip" else FolderWriter(dest_path)
    _JOB.update(source=src, mode="L" if model.in_channels == 1 else "RGB")
    written: list[list] = []
    stats = np.zeros((3, model.latent_channels), dtype=np.float64)  # sum mean, mean^2, std^2
    count = 0
    shape: tuple[int, ...] | None = None
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        nonlocal count
        if not pending:
            return
        x = torch.from_numpy(np.stack([a for _, a in pending])).permute(0, 3, 1, 2)
        mean, std = model.encode(model.to_pixels(x.to(device)))
        mean, std = mean.float().cpu(), std.float().cpu()
        stats[0] += mean.double().sum((0, 2, 3)).numpy()
        stats[1] += mean.double().square().sum((0, 2, 3)).numpy()
        stats[2] += std.double().square().sum((0, 2, 3)).numpy()
        count += mean.shape[0] * mean.shape[2] * mean.shape[3]
        for (i, _), m, s in zip(pending, mean, std, strict=True):
            name = archive_name(i, "npy", LATENT_STEM)
            writer.add(name, npy_bytes(torch.cat([m, s]).numpy()))
            written.append([name, None if labels is None else int(labels[i])])
        pending.clear()

    try:
        for i, img, error in tqdm(
            _images(n, num_workers), total=n, desc=f"encode -> {dest}", disable=not progress
        ):
            if error is not None:
                if not skip_corrupt:
                    raise ConfigError(f"{error}; remove it or set skip_corrupt=true")
                log.warning("skipping %s", error)
                continue
            if shape is None:
                shape = img.shape
                if shape[0] % model.factor or shape[1] % model.factor:
                    raise ConfigError(
                        f"images are {shape[1]}x{shape[0]}, not divisible by the VAE's "
                        f"downsampling factor {model.factor} (vae={vae!r})"
                    )
            elif img.shape != shape:
                raise ConfigError(
                    f"{src.name(i)} is {img.shape[1]}x{img.shape[0]}, the first image "
                    f"{shape[1]}x{shape[0]}; encode a dataset of one size (dl-dataset convert "
                    "resolution=...)"
                )
            pending.append((i, img))
            if len(pending) == batch_size:
                flush()
        flush()
        if not written:
            raise ConfigError(f"source={source!r}: no image was encoded")
        raw_mean = stats[0] / count
        raw_std = np.sqrt(np.maximum(stats[1] / count - raw_mean**2 + stats[2] / count, 0.0))
        info = {
            "vae": {"kind": model.kind, "path": str(vae), "sha256": model.sha256},
            "pixel_range": list(model.pixel_range),
            "image_shape": [model.in_channels, int(shape[0]), int(shape[1])],
            "raw_mean": raw_mean.tolist(),
            "raw_std": raw_std.tolist(),
            "count": len(written),
        }
        table = written if labels is not None else None
        writer.close(json.dumps({"labels": table, METADATA_KEY: info}).encode())
    except BaseException:
        writer.abort()
        raise
    finally:
        _JOB.clear()
    return {"dest": str(dest_path), **info}
