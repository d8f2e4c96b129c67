"""The sampling folder: whole files only, its record refuses other settings, and the grid and npz
built from the files equal those built from the samples in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusionlab.errors import ConfigError
from diffusionlab.sampling.writer import RECORD, SampleFolder, file_identity


def _images(n: int, channels: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(channels)
    return (torch.rand(n, channels, 6, 5, generator=g) * 2.2 - 1.1).clamp(-1, 1)


@pytest.mark.parametrize("channels", [1, 3])
def test_files_round_trip_and_build_the_grid_and_npz_of_memory(tmp_path, channels):
    x = _images(7, channels)
    seeds = [3, 10, 11, 12, 40, 41, 99]
    folder = SampleFolder(tmp_path / "a", {"sampler": "euler"})
    folder.write(seeds[:4], x[:4])
    folder.write(seeds[4:], x[4:])
    (folder.outdir / "000005.png.tmp").write_bytes(b"\x89PNG half")  # a write killed midway
    assert folder.written(range(200)) == set(seeds)
    back = folder.read(seeds)
    assert back.dtype == torch.uint8 and back.shape == (7, channels, 6, 5)
    assert torch.equal(back, (x * 127.5 + 128).clamp(0, 255).to(torch.uint8))  # EDM rounding
    labels = torch.arange(7) % 3
    folder.write_npz(seeds, labels=labels, batch=3)  # streamed from the files
    streamed = dict(np.load(folder.outdir / "samples.npz"))
    mem = SampleFolder(tmp_path / "b", {})
    mem.write_npz(seeds, x, labels)
    in_memory = dict(np.load(mem.outdir / "samples.npz"))
    assert set(streamed) == {"seeds", "samples", "labels"}
    for k in streamed:
        np.testing.assert_array_equal(streamed[k], in_memory[k])
    assert streamed["samples"].shape == (7, 6, 5, channels)
    folder.write_grid(back)
    mem.write_grid(x)
    assert (folder.outdir / "grid.png").read_bytes() == (mem.outdir / "grid.png").read_bytes()


def test_a_folder_of_other_settings_is_refused(tmp_path):
    ckpt = tmp_path / "a.ckpt"
    ckpt.write_bytes(b"weights")
    record = {"ckpt": file_identity(ckpt), "sampler": {"name": "euler", "nfe": 8}}
    first = SampleFolder(tmp_path / "out", record)
    assert not first.check_record()
    first.write_record()
    assert SampleFolder(tmp_path / "out", record).check_record()  # the same: resume
    other = {**record, "sampler": {"name": "euler", "nfe": 16}}
    with pytest.raises(ConfigError, match=r"outdir=.*other settings \(sampler\)"):
        SampleFolder(tmp_path / "out", other).check_record()
    ckpt.write_bytes(b"retrained")  # last.ckpt overwritten by a longer run
    with pytest.raises(ConfigError, match=r"\(ckpt\)"):
        SampleFolder(tmp_path / "out", {**record, "ckpt": file_identity(ckpt)}).check_record()
    (tmp_path / "out" / RECORD).write_text("{not json")
    with pytest.raises(ConfigError, match="delete the folder"):
        SampleFolder(tmp_path / "out", record).check_record()
