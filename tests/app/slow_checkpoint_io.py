"""Test-only checkpoint IO: a save of ``last.ckpt`` from ``from_step`` on writes half the bytes,
touches ``marker`` and hangs, so a test can SIGKILL the process in the middle of a save."""

from __future__ import annotations

import io
import time
from pathlib import Path

import torch

from diffusionlab.training.checkpoint_io import AtomicCheckpointIO


class SlowCheckpointIO(AtomicCheckpointIO):
    def __init__(self, from_step: int, marker: str) -> None:
        super().__init__()
        self.from_step = from_step
        self.marker = Path(marker)

    def write(self, checkpoint: dict, f) -> None:
        if checkpoint["global_step"] >= self.from_step and Path(f.name).name == "last.ckpt.tmp":
            buf = io.BytesIO()
            torch.save(checkpoint, buf)
            f.write(buf.getvalue()[: buf.tell() // 2])
            f.flush()
            self.marker.touch()
            time.sleep(300)
        super().write(checkpoint, f)
