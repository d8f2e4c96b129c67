"""The folder a sampling run writes: one PNG per seed (``<seed:06d>.png``, written atomically, so a
file that exists is whole), the record of the settings that made them (``sampling.json``), and the
grid and ``samples.npz`` built from the files. A rerun into the same folder skips the seeds whose
file exists, which is what makes generation resumable: an image depends on its seed only."""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffusionlab.errors import ConfigError
from diffusionlab.files import atomic_write, atomic_write_text
from diffusionlab.sampling.images import save_samples_png, to_uint8_rgb

RECORD = "sampling.json"


def file_identity(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """What tells a checkpoint apart without reading it: its resolved path, and for a file its
    size and modification time (a retrained ``last.ckpt`` is another file)."""
    if path is None:
        return None
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        return {"path": str(p)}
    st = p.stat()
    return {"path": str(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


class SampleFolder:
    """``outdir`` of a sampling run. ``record`` is every setting an image depends on besides its
    seed (checkpoint, sampler, guidance, condition): a folder holding images of other settings is
    refused rather than mixed."""

    def __init__(self, outdir: str | os.PathLike, record: dict[str, Any], prefix: str = "") -> None:
        self.outdir = Path(outdir)
        self.record = json.loads(json.dumps(record))  # plain JSON values, as read back
        self.prefix = prefix

    def part(self, prefix: str) -> SampleFolder:
        """The same folder and record, files named ``<prefix><seed:06d>.png`` (a prompts file's
        rows: ``p000_``, ``p001_``, ...)."""
        return SampleFolder(self.outdir, self.record, prefix)

    def path(self, seed: int) -> Path:
        return self.outdir / f"{self.prefix}{seed:06d}.png"

    def check_record(self) -> bool:
        """Raise when the folder holds images of other settings; True when it has a record
        (images from an earlier run may be there)."""
        path = self.outdir / RECORD
        if not path.is_file():
            return False
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old != self.record:
            keys = sorted(
                k
                for k in set(self.record) | set(old or {})
                if (old or {}).get(k) != self.record.get(k)
            )
            raise ConfigError(
                f"outdir={str(self.outdir)!r} holds images made with other settings "
                f"({', '.join(keys) or 'unreadable ' + RECORD}); pass another outdir=..., or "
                f"delete the folder to start over"
            )
        return True

    def write_record(self) -> None:
        atomic_write_text(self.outdir / RECORD, json.dumps(self.record, indent=2) + "\n")

    def written(self, seeds: Iterable[int]) -> set[int]:
        """The seeds whose image is already in the folder (``*.png.tmp`` leftovers of a killed
        write do not count)."""
        if not self.outdir.is_dir():
            return set()
        names = set(os.listdir(self.outdir))
        return {s for s in seeds if self.path(s).name in names}

    def write(self, seeds: Sequence[int], x: Tensor) -> None:
        """One PNG per seed of float images ``x`` in [-1, 1] (EDM's rounding to uint8)."""
        from PIL import Image

        arr = to_uint8_rgb(x)[:, : x.shape[1]].permute(0, 2, 3, 1).numpy()
        for seed, img in zip(seeds, arr, strict=True):
            buf = io.BytesIO()
            Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(buf, format="PNG")
            atomic_write(self.path(seed), lambda f, b=buf: f.write(b.getvalue()))

    def read(self, seeds: Sequence[int]) -> Tensor:
        """The images of ``seeds`` as uint8 [N, C, H, W] (C as written: 1 or 3)."""
        from PIL import Image

        out = []
        for seed in seeds:
            with Image.open(self.path(seed)) as im:
                a = np.array(im)
            out.append(torch.from_numpy(a[:, :, None] if a.ndim == 2 else a))
        return torch.stack(out).permute(0, 3, 1, 2)

    def write_grid(self, x: Tensor, nrow: int | None = None) -> Path:
        """``grid.png`` of samples (float in [-1, 1], or uint8 as read back), ``nrow`` per row."""
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1  # to_uint8 maps it back to the same bytes
        return save_samples_png(x, self.outdir / "grid.png", nrow)

    def write_npz(
        self,
        seeds: Sequence[int],
        samples: Tensor | None = None,
        labels: Tensor | None = None,
        batch: int = 256,
        extra: dict[str, np.ndarray] | None = None,
    ) -> Path:
        """``samples.npz`` (``seeds``, ``samples`` as uint8 NHWC images or the float samples of
        2-D data, ``labels`` when conditional), as ``np.savez`` writes it. Without ``samples``
        the images are streamed from the PNG files, ``batch`` at a time, so memory does not grow
        with the number of images."""
        arrays: dict[str, np.ndarray] = {"seeds": np.asarray(seeds)}
        if labels is not None:
            arrays["labels"] = labels.numpy()
        arrays.update(extra or {})  # e.g. each sample's prompt

        def write(f) -> None:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for name, a in arrays.items():
                    with zf.open(f"{name}.npy", "w", force_zip64=True) as m:
                        np.lib.format.write_array(m, a, allow_pickle=False)
                with zf.open("samples.npy", "w", force_zip64=True) as m:
                    if samples is not None:
                        a = samples
                        if a.ndim == 4:
                            a = to_uint8_rgb(a)[:, : a.shape[1]].permute(0, 2, 3, 1)
                        np.lib.format.write_array(m, a.contiguous().numpy(), allow_pickle=False)
                        return
                    first = self.read(seeds[:1]).permute(0, 2, 3, 1)
                    header = {
                        "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                        "fortran_order": False,
                        "shape": (len(seeds), *first.shape[1:]),
                    }
                    np.lib.format.write_array_header_2_0(m, header)
                    for s in range(0, len(seeds), batch):
                        x = self.read(seeds[s : s + batch]).permute(0, 2, 3, 1).contiguous()
                        m.write(x.numpy().tobytes())

        return atomic_write(self.outdir / "samples.npz", write)
