"""FID, IS, KID, precision/recall and FD-DINOv2 from feature dicts through torch-fidelity's own
formulas, and a numpy-2 safe call of ``torch_fidelity.calculate_metrics``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch_fidelity
from torch import Tensor
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from diffusionlab.evaluation.features import Features

METRICS = ("fid", "kid", "prc", "isc", "fd_dinov2")
# what is computed unless asked otherwise (FD-DINOv2 needs a local DINOv2 file)
DEFAULT_METRICS = ("fid", "kid", "prc", "isc")


def statistics(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of ``[N, d]`` features (float64, as torch-fidelity computes them)."""
    stats = fid_features_to_statistics(features.double())
    return stats["mu"], stats["sigma"]


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) (Heusel et al. 2017, eq. 6)."""
    return fid_statistics_to_metric(
        {"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, False
    )["frechet_inception_distance"]


def compute_metrics(
    generated: Features,
    reference: Features,
    layers: dict[str, str],
    metrics: Sequence[str] = DEFAULT_METRICS,
    kid_subset_size: int = 1000,
    seed: int = 2020,
) -> dict[str, float]:
    """Metrics of ``generated`` against ``reference`` features; ``layers`` maps metric -> layer.

    Keys: ``fid``, ``kid_mean``/``kid_std``, ``precision``/``recall``/``f_score``,
    ``is_mean``/``is_std`` (IS needs no reference), ``fd_dinov2`` (the Frechet distance of
    DINOv2 class-token features, Stein et al. 2023, layer ``layers["fd_dinov2"]``).
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
    out: dict[str, float] = {}
    if "fid" in metrics:
        out["fid"] = frechet_distance(
            *statistics(generated[layers["fid"]]), *statistics(reference[layers["fid"]])
        )
    if "fd_dinov2" in metrics:
        out["fd_dinov2"] = frechet_distance(
            *statistics(generated[layers["fd_dinov2"]]),
            *statistics(reference[layers["fd_dinov2"]]),
        )
    if "kid" in metrics:
        g, r = generated[layers["kid"]], reference[layers["kid"]]
        size = min(kid_subset_size, g.shape[0], r.shape[0])
        kid = kid_features_to_metric(g, r, kid_subset_size=size, rng_seed=seed, verbose=False)
        out["kid_mean"] = kid["kernel_inception_distance_mean"]
        out["kid_std"] = kid["kernel_inception_distance_std"]
    if "prc" in metrics:
        prc = prc_features_to_metric(
            generated[layers["prc"]], reference[layers["prc"]], verbose=False
        )
        out.update({k: float(prc[k]) for k in ("precision", "recall", "f_score")})
    if "isc" in metrics:
        isc = isc_features_to_metric(generated[layers["isc"]], rng_seed=seed)
        out["is_mean"] = isc["inception_score_mean"]
        out["is_std"] = isc["inception_score_std"]
    return out


@contextlib.contextmanager
def numpy_int_compat() -> Iterator[None]:
    """Restore ``np.int`` (removed in numpy 1.24) while torch-fidelity 0.4.0 draws class labels
    for conditional generators (``utils.get_featuresdict_from_generative_model``)."""
    had = "int" in np.__dict__
    if not had:
        np.int = int  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if not had:
            del np.int  # type: ignore[attr-defined]


def calculate_metrics(**kwargs) -> dict[str, float]:
    """``torch_fidelity.calculate_metrics`` that also works for class-conditional generators."""
    with numpy_int_compat():
        return torch_fidelity.calculate_metrics(**kwargs)
