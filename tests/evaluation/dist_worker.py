"""One process of the distributed-evaluation test (importable by torch.multiprocessing spawn)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from diffusionlab.diffusion.schedules import get_schedule
from diffusionlab.evaluation.extractors import create_extractor, default_layers, domain_name
from diffusionlab.evaluation.features import generated_features
from diffusionlab.evaluation.metrics import compute_metrics
from diffusionlab.evaluation.reference import load_dataset
from diffusionlab.sampling.conditioning import ClassLabels
from diffusionlab.sampling.generator import DiffusionGenerator
from diffusionlab.sampling.spec import SamplerSpec

NUM_SAMPLES = 50


def build(weights: str) -> tuple[DiffusionGenerator, object]:
    """A cheap class-conditional analytic model with a stochastic sampler, and the extractor."""
    from .conftest import RESOLUTION, ClassGaussians

    data = load_dataset("mnist", RESOLUTION)
    model = ClassGaussians(data.images, data.labels, 10, diagonal=True)
    gen = DiffusionGenerator(
        model,
        get_schedule("edm"),
        (1, RESOLUTION, RESOLUTION),
        ClassLabels(10),
        spec=SamplerSpec(name="euler_ancestral", nfe=8),
    )
    return gen, create_extractor(domain_name("mnist", RESOLUTION), weights)


def evaluate(weights: str, reference: str, batch_size: int) -> tuple[dict, dict]:
    """Features of seeds 0..N-1 and FID/KID/PR against the stored reference features."""
    torch.set_num_threads(1)
    gen, extractor = build(weights)
    feats = generated_features(gen, extractor, range(NUM_SAMPLES), batch_size)
    ref = torch.load(reference, weights_only=True)
    layers = default_layers(extractor.get_name())
    return feats, compute_metrics(feats, ref, layers, metrics=("fid", "kid", "prc"))


def worker(rank: int, world_size: int, port: int, weights: str, reference: str, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        feats, metrics = evaluate(weights, reference, batch_size=7)
        if rank == 0:
            torch.save(feats, Path(out) / "features.pt")
            (Path(out) / "metrics.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()
