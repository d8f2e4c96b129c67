"""A :class:`Pretrained` model as the ``DiffusionModule`` every app samples from, and its weights
as the starting point of a training run (``train.py init_ckpt=...``)."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class

from diffusionlab.errors import CheckpointError, ConfigError
from diffusionlab.interop.model import Pretrained, load_net_state
from diffusionlab.interop.vae import StabilityVAEDecoder
from diffusionlab.training.module import DiffusionModule

log = logging.getLogger(__name__)


def to_module(model: Pretrained, device: Any = "cpu", near: str | Path = ".") -> DiffusionModule:
    """``DiffusionModule(**model.hparams)`` with ``model.net_state`` in its network, EMA and
    every EMA profile; an EDM2 latent model decodes through the VAE it names (found beside
    ``near``, :mod:`diffusionlab.interop.vae`)."""
    where = model.info.get("source", "ckpt")
    try:
        module = DiffusionModule(**model.hparams)
    except (TypeError, ValueError, KeyError, InstantiationException) as e:
        if isinstance(e, ConfigError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{where}: its config does not build a model ({first})") from None
    half = torch.float16 if model.info.get("use_fp16") else None
    for denoiser in (module.denoiser, module.ema, *module.ema_profiles):
        load_net_state(denoiser.net, model.net_state, where)
        denoiser.cuda_net_dtype = half  # F in float16 on CUDA, as the NVlabs wrapper ran it
    if model.decoder_state is not None:
        if module.decoder is None:
            raise CheckpointError(f"{where} has decoder weights but no latent config")
        load_net_state(module.decoder, model.decoder_state, f"{where} (decoder)")
    vae = model.info.get("vae")
    if vae:
        module.decoder = StabilityVAEDecoder(vae["name"], vae["scale"], vae["bias"], near)
    module.sample_dtype = model.sample_dtype
    module.pretrained_info = model.info
    return module.eval().to(device)


# structural keys only: these may differ between a model and the run that fine-tunes it
TRAINING_ONLY = ("dropout", "label_dropout", "checkpointing")


def init_weights(module: DiffusionModule, path: str, key: str = "init_ckpt") -> None:
    """Start ``module`` (network, EMA and EMA profiles) from the sampling weights of ``path``:
    a train.py checkpoint, an NVlabs pickle or an exported folder. Its network config must
    match the run's (dropout aside) and so must the parameterization, which gives F its meaning."""
    from diffusionlab.interop import is_pretrained, read_pretrained
    from diffusionlab.interop.export import from_checkpoint

    model = read_pretrained(path, key) if is_pretrained(path) else from_checkpoint(path, key=key)
    where = f"{key}={str(path)!r}"
    diffs = _differences(model.hparams["model"], dict(module.hparams.model), "model", TRAINING_ONLY)
    diffs += _differences(
        _network_config(model.hparams["parameterization"]),
        _network_config(dict(module.hparams.parameterization)),
        "parameterization",
        (),
    )
    if [list(model.hparams["data_shape"]), int(model.hparams["label_dim"])] != [
        list(module.data_shape),
        module.label_dim,
    ]:
        diffs.append(
            f"data_shape/label_dim: {model.hparams['data_shape']}/{model.hparams['label_dim']} "
            f"vs {list(module.data_shape)}/{module.label_dim}"
        )
    if diffs:
        raise ConfigError(
            f"{where} does not fit this run's model (checkpoint vs run: {'; '.join(diffs[:5])}); "
            "set the run's overrides to the checkpoint's values"
        )
    state = model.net_state
    if module.denoiser.parameterization.end_features:
        state = with_end_map(module.denoiser.net.state_dict(), state)
    for denoiser in (module.denoiser, module.ema, *module.ema_profiles):
        load_net_state(denoiser.net, state, where)
    log.info("%s: network and EMA start from its weights", where)


# the vector-input maps of the networks (networks/context.py), where a flow map's second time
# enters: added to the embedding (zero columns add nothing), or blended into it (EDM2's
# magnitude-preserving sum, whose weights are renormalised: new columns keep their own init)
ADDED_VECTOR_MAP, BLENDED_VECTOR_MAP = "map_vector.weight", "emb_vector.weight"


def with_end_map(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict:
    """A one-time model's weights for a flow-map network (``parameterization=flow_map``): its
    vector map widened for the second-time features (a new map where it had none), the new
    columns zero where the map adds to the embedding, so that network starts as the
    checkpoint's whatever the second time; EDM2's blended map keeps its own init there."""
    out = dict(state)
    for key in (ADDED_VECTOR_MAP, BLENDED_VECTOR_MAP):
        if key not in own or (key in state and state[key].shape == own[key].shape):
            continue
        wide = own[key].new_zeros(own[key].shape) if key == ADDED_VECTOR_MAP else own[key].clone()
        if key in state:
            old = state[key]
            wide[:, : old.shape[1]] = old.to(wide)
        out[key] = wide
    return out


def _network_config(cfg: dict) -> dict:
    """The parameterization config that gives F its meaning (``Parameterization.network_config``:
    a consistency model's F is its EDM teacher's, so ECT starts from an EDM checkpoint)."""
    try:
        cls = get_class(cfg["_target_"])
    except (KeyError, ImportError, ValueError):
        return dict(cfg)
    to_network = getattr(cls, "network_config", None)
    return dict(to_network(dict(cfg))) if to_network else dict(cfg)


def _with_defaults(cfg: dict) -> dict:
    """``cfg`` with the constructor defaults of its ``_target_`` for the keys it leaves out."""
    try:
        params = inspect.signature(get_class(cfg["_target_"]).__init__).parameters.values()
    except (KeyError, ImportError, ValueError, TypeError):
        return dict(cfg)
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return {**defaults, **cfg}


def _differences(saved: dict, run: dict, name: str, ignore: tuple[str, ...]) -> list[str]:
    """``name.key: saved vs run`` for each constructor argument that differs."""
    saved, run = _with_defaults(saved), _with_defaults(run)
    out = []
    for k in sorted(set(saved) | set(run)):
        if k in ignore or k == "_partial_":
            continue
        a, b = _norm(saved.get(k)), _norm(run.get(k))
        if a != b:
            out.append(f"{name}.{k}: {a!r} vs {b!r}")
    return out


def _norm(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return v
