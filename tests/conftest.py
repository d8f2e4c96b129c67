"""Shared test setup: no W&B traffic, one CPU thread, no Hydra noise.

Tiny tensors run fastest on one thread, and two OpenMP threads per process slow to a crawl when
several processes share the 2 cores (subprocess apps inherit OMP_NUM_THREADS)."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
