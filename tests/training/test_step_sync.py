"""No host-device synchronisation in a training step: between two logging steps nothing reads a
tensor back to the host.

On the CPU there is no device to wait for, so the test counts what would make the host wait on
one: every ATen call that returns a tensor's value to Python or sizes its result by the data
(``_local_scalar_dense`` behind ``.item()``, ``bool()``, ``float()``, ``if tensor``;
``nonzero``, boolean masks, ``unique``, ...) and ``tolist`` / ``numpy``, except the data
loader's reads of its host-side samples. It runs the real
``trainer.fit`` with the default callbacks (rich progress bar, checkpoints, LR monitor, CSV),
augmentation on its device path, class labels with label dropout, network dropout and the
non-finite guard. Lightning's DDP broadcast of its SIGTERM flag (one read per step, DDP only)
is outside this single-process run."""

from __future__ import annotations

import os
import sys

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import diffusionlab.data.augment as augment
from app.helpers import compose_train
from diffusionlab.cli.train import train

READS = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "repeat_interleave",
    "equal",
    "is_nonzero",
}


class HostReads(TorchDispatchMode):
    """Counts host reads per training batch (the batch that began last)."""

    def __init__(self) -> None:
        super().__init__()
        self.step = -1
        self.reads: dict[int, list[str]] = {}

    def note(self, what: str) -> None:
        if not _in_data_loader():  # the loader reads its host-side samples (labels): no device
            self.reads.setdefault(self.step, []).append(what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in READS or (name == "index" and any(_bool_index(a) for a in args[1])):
            self.note(name)
        return func(*args, **(kwargs or {}))


def _in_data_loader() -> bool:
    frame = sys._getframe()
    while frame is not None:
        if f"torch{os.sep}utils{os.sep}data{os.sep}" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def _bool_index(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == torch.bool


MODE = HostReads()


class StepMarker(L.Callback):
    """The batches' boundaries for the counter."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        MODE.step = trainer.global_step


@pytest.fixture
def count_reads(monkeypatch):
    for name in ("tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def wrapped(self, *a, _original=original, _name=name, **k):
            MODE.note(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    # the augmentation's device path (on a GPU: warp all, keep the moved), here on the CPU
    monkeypatch.setattr(augment, "SELECTIVE_WARP_DEVICES", set())
    MODE.reads.clear()
    MODE.step = -1
    return MODE


# sCM's step: a forward-mode JVP through the network, its tangent warm-up and adaptive weighting
SCM = ["parameterization=consistency", "parameterization.sigma_min=0", "loss=scm"]
# MeanFlow's: the JVP of its average velocity, a flow map's second time through cond_vector
MEANFLOW = ["parameterization=flow_map", "loss=meanflow", "sampler=flow_map"]


@pytest.mark.parametrize("extra", [[], SCM, MEANFLOW], ids=["edm", "scm", "meanflow"])
def test_no_host_reads_between_logging_steps(tmp_path, count_reads, extra):
    overrides = [
        "dataset=digits",
        "model=unet_tiny",
        "data.batch_size=8",
        "trainer.max_steps=8",
        "trainer.log_every_n_steps=4",
        "trainer.enable_model_summary=false",
        "logger=csv",
        "callbacks.sample_grid.every_n_steps=0",
        # no autoguidance guide: taking it writes a checkpoint, which reads every weight
        "callbacks.sample_grid.guidance=1.0",
        "augment=edm",
        "augment.p=0.5",
        "label_dim=10",
        "model.label_dropout=0.2",
        "model.dropout=0.2",
        "+callbacks.marker={_target_:test_step_sync.StepMarker}",
        f"paths.log_dir={tmp_path}",
        *extra,
    ]
    with count_reads:
        train(compose_train(overrides, tmp_path))
    reads = count_reads.reads
    logging = {3, 7}  # steps 4 and 8 (log_every_n_steps=4; the last step logs too)
    quiet = {s: r for s, r in reads.items() if s >= 0 and s not in logging}
    assert quiet == {}, quiet
    assert reads.get(3), "the counter sees the logging step's reads"
