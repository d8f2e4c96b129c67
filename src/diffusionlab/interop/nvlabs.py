"""NVlabs/edm and edm2 network pickles as diffusionlab models.

The pickle's ``ema`` network is a preconditioning wrapper around a U-Net; each maps onto our
pieces with the same weights, name for name (``tests/networks`` checks the forward passes):

============================  =====================================================================
NVlabs (``training.networks``) diffusionlab
============================  =====================================================================
``EDMPrecond``                ``EDMSchedule`` on generate.py's [0.002, 80] + ``EDMParam(sigma_data)``
``VPPrecond``                 ``SigmaRange(VPSchedule(beta_min, beta_d, epsilon_t), 0.002, 80)`` +
                              ``interop.schedules.VPPrecond(M)`` (eps, c_noise (M - 1) t(sigma))
``VEPrecond``                 ``SigmaRange(VESchedule(sigma_min, sigma_max), 0.002, 80)`` +
                              ``interop.schedules.VEPrecond``
``model.*`` ``SongUNet``      ``networks.SongUNet`` (DDPM++ / NCSN++), same kwargs
``model.*`` ``DhariwalUNet``  ``networks.DhariwalUNet`` (ADM), same kwargs
edm2 ``Precond``              ``EDMSchedule(0.002, 80)`` + ``EDMParam(sigma_data)``; ``unet.*`` and
                              the ``logvar_*`` head -> ``networks.EDM2UNet(logvar_channels=...)``
edm2 ``StabilityVAEEncoder``  ``interop.vae.StabilityVAEDecoder`` (diffusers AutoencoderKL folder)
============================  =====================================================================

Unset constructor arguments take NVlabs' defaults (written out below, not ours). EDM2's EMA length
and the training time come from the file name (``<name>-<kimg>-<std>.pkl``, as its
``reconstruct_phema.py`` reads them), EDM's from ``network-snapshot-<kimg>.pkl``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from diffusionlab.config import CONF_DIR
from diffusionlab.errors import CheckpointError
from diffusionlab.interop.model import Pretrained
from diffusionlab.interop.nvlabs_pickle import PersistentRecord, read_pickle, state_dict

# generate.py's grid ends, intersected with each network's own range
EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0

# constructor arguments (after the positional img_resolution, img_channels) and their defaults
PRECONDS: dict[str, dict[str, Any]] = {
    "EDMPrecond": dict(
        label_dim=0,
        use_fp16=False,
        sigma_min=0,
        sigma_max=math.inf,
        sigma_data=0.5,
        model_type="DhariwalUNet",
    ),
    "VPPrecond": dict(
        label_dim=0,
        use_fp16=False,
        beta_d=19.9,
        beta_min=0.1,
        M=1000,
        epsilon_t=1e-5,
        model_type="SongUNet",
    ),
    "VEPrecond": dict(
        label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100, model_type="SongUNet"
    ),
    "Precond": dict(label_dim=0, use_fp16=True, sigma_data=0.5, logvar_channels=128),
}
NETWORKS: dict[str, dict[str, Any]] = {
    "SongUNet": dict(
        augment_dim=0,
        model_channels=128,
        channel_mult=[1, 2, 2, 2],
        channel_mult_emb=4,
        num_blocks=4,
        attn_resolutions=[16],
        dropout=0.10,
        label_dropout=0,
        embedding_type="positional",
        channel_mult_noise=1,
        encoder_type="standard",
        decoder_type="standard",
        resample_filter=[1, 1],
    ),
    "DhariwalUNet": dict(
        augment_dim=0,
        model_channels=192,
        channel_mult=[1, 2, 3, 4],
        channel_mult_emb=4,
        num_blocks=3,
        attn_resolutions=[32, 16, 8],
        dropout=0.10,
        label_dropout=0,
    ),
    # edm2 UNet and its Block kwargs
    "EDM2UNet": dict(
        model_channels=192,
        channel_mult=[1, 2, 3, 4],
        channel_mult_noise=None,
        channel_mult_emb=None,
        num_blocks=3,
        attn_resolutions=[16, 8],
        label_balance=0.5,
        concat_balance=0.5,
        resample_filter=[1, 1],
        channels_per_head=64,
        dropout=0,
        res_balance=0.3,
        attn_balance=0.3,
        clip_act=256,
    ),
}
# StabilityVAEEncoder's defaults (edm2 training/encoders.py)
VAE_DEFAULTS = dict(
    vae_name="stabilityai/sd-vae-ft-mse",
    raw_mean=[5.81, 3.25, 0.12, -2.15],
    raw_std=[4.17, 4.62, 3.71, 3.28],
    final_mean=0.0,
    final_std=0.5,
)


def _plain(v: Any) -> Any:
    """Containers and numpy scalars as plain Python (lists for tuples)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if hasattr(v, "tolist") and not isinstance(v, str):
        return _plain(v.tolist())
    return v


def _arguments(record: PersistentRecord, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the preconditioning's own arguments with defaults, the network's keyword arguments)."""
    if record.state.get("_init_kwargs") is None:
        raise CheckpointError(
            f"{where}: its {record.class_name} does not record the arguments it was built with"
        )
    names = ["img_resolution", "img_channels", *PRECONDS[record.class_name]]
    given = dict(zip(names, _plain(list(record.init_args)), strict=False))
    given.update(_plain(record.init_kwargs))
    for name in ("img_resolution", "img_channels"):
        if name not in given:
            raise CheckpointError(f"{where}: {record.class_name} has no {name}")
    own = {**PRECONDS[record.class_name]}
    own.update({k: given.pop(k) for k in [*own, "img_resolution", "img_channels"] if k in given})
    return own, given


def _network(kind: str, kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    """NVlabs' defaults for ``kind`` updated with ``kwargs`` (unknown arguments refused)."""
    unknown = sorted(set(kwargs) - set(NETWORKS[kind]))
    if unknown:
        raise CheckpointError(f"{where}: {kind} argument(s) {unknown} are not supported here")
    return {**NETWORKS[kind], **kwargs}


def _conf(group: str, name: str) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / group / f"{name}.yaml"))


def _file_record(path: Path) -> dict[str, Any]:
    """Training time (kimg) and EMA length as the NVlabs file names carry them."""
    m = re.fullmatch(r".*-(\d+)-(\d+\.\d+)\.pkl", path.name)
    if m:  # edm2: <prefix>-<kimg>-<std>.pkl
        return {"kimg": int(m.group(1)), "ema_std": float(m.group(2))}
    m = re.fullmatch(r"network-snapshot-(\d+)\.pkl", path.name)
    return {"kimg": int(m.group(1))} if m else {}


def _network_record(data: Any, where: str) -> PersistentRecord:
    net = data.get("ema", data.get("net")) if isinstance(data, dict) else data
    if not isinstance(net, PersistentRecord):
        raise CheckpointError(
            f"{where} holds no NVlabs network (a dict with 'ema', as edm/edm2 write them)"
        )
    if net.class_name == "iDDPMPrecond":
        raise CheckpointError(
            f"{where}: iDDPMPrecond (EDM's baseline-imagenet-64x64-cond-adm, ADM's own weights) "
            "is not supported; the EDM-trained edm-imagenet-64x64-cond-adm.pkl is"
        )
    if net.class_name not in PRECONDS:
        raise CheckpointError(
            f"{where}: network class {net.class_name!r} is not supported "
            f"(supported: {', '.join(PRECONDS)})"
        )
    return net


def read_nvlabs(path: str | Path, key: str = "ckpt") -> Pretrained:
    """An NVlabs/edm or edm2 pickle as a :class:`Pretrained` model (restricted unpickling)."""
    path = Path(path).expanduser()
    where = f"{key}={str(path)!r}"
    data = read_pickle(path, key)
    net = _network_record(data, where)
    own, net_kwargs = _arguments(net, where)
    weights = state_dict(net)
    res, channels, label_dim = (
        int(own["img_resolution"]),
        int(own["img_channels"]),
        own["label_dim"],
    )
    label_dim = int(label_dim or 0)
    info: dict[str, Any] = {
        "source": where,
        "file": path.name,
        "class": net.class_name,
        "use_fp16": bool(own["use_fp16"]),
        **_file_record(path),
    }
    if isinstance(data, dict) and isinstance(data.get("dataset_kwargs"), dict):
        info["dataset"] = _plain(data["dataset_kwargs"])
    common = dict(img_resolution=res, label_dim=label_dim)
    if net.class_name == "Precond":
        model = {
            "_target_": "diffusionlab.networks.EDM2UNet",
            **common,
            "in_channels": channels,
            "out_channels": channels,
            "augment_dim": 0,
            "label_dropout": 0.0,
            **_network("EDM2UNet", net_kwargs, where),
            "logvar_channels": int(own["logvar_channels"]),
            "checkpointing": False,
        }
        net_state = {
            k.removeprefix("unet."): v
            for k, v in weights.items()
            if k.startswith(("unet.", "logvar_"))
        }
        schedule = {
            "_target_": "diffusionlab.diffusion.schedules.EDMSchedule",
            "sigma_min": EDM_SIGMA_MIN,
            "sigma_max": EDM_SIGMA_MAX,
        }
        param = {**_conf("parameterization", "edm"), "sigma_data": float(own["sigma_data"])}
        info.update(format="nvlabs/edm2", network="UNet", sample_dtype="float32")
        info["vae"] = _vae(data.get("encoder") if isinstance(data, dict) else None, where)
        loss, nfe = _conf("loss", "edm2"), 63  # edm2 generate_images.py: 32 steps
        ema = {
            "_target_": "diffusionlab.training.ema.PowerEMA",
            "sigma_rels": [info.get("ema_std", 0.1)],
            "snapshot_every": 0,
            "snapshot_dir": None,
        }
    else:
        kind = str(own["model_type"])
        if kind not in ("SongUNet", "DhariwalUNet"):
            raise CheckpointError(f"{where}: model_type={kind!r} is not supported")
        model = {
            "_target_": f"diffusionlab.networks.{kind}",
            **common,
            "in_channels": channels,
            "out_channels": channels,
            **_network(kind, net_kwargs, where),
            "checkpointing": False,
        }
        net_state = {k.removeprefix("model."): v for k, v in weights.items()}
        schedule, param = _edm_schedule(net.class_name, own)
        info.update(format="nvlabs/edm", network=kind, sample_dtype="float64")
        loss, nfe = _conf("loss", "edm"), 35  # generate.py: 18 steps
        # not recorded in the pickle: EDM's default --ema=0.5 (Mimg)
        ema = {**_conf("ema", "edm")}
    hparams = {
        "model": model,
        "schedule": schedule,
        "parameterization": param,
        "loss": loss,
        "optimizer": _conf("optimizer", "adam"),
        "ema": ema,
        "data_shape": [channels, res, res],
        "label_dim": label_dim,
        "sampler": {"name": "heun", "nfe": nfe, "discretization": "karras", "options": {}},
        "latent": None,
    }
    return Pretrained(hparams, net_state, info)


def _edm_schedule(name: str, own: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(schedule, parameterization) of an EDM preconditioning."""
    if name == "EDMPrecond":
        schedule = {
            "_target_": "diffusionlab.diffusion.schedules.EDMSchedule",
            "sigma_min": max(EDM_SIGMA_MIN, float(own["sigma_min"])),
            "sigma_max": min(EDM_SIGMA_MAX, float(own["sigma_max"])),
        }
        return schedule, {
            **_conf("parameterization", "edm"),
            "sigma_data": float(own["sigma_data"]),
        }
    if name == "VPPrecond":
        base = {
            "_target_": "diffusionlab.diffusion.schedules.VPSchedule",
            "beta_min": float(own["beta_min"]),
            "beta_d": float(own["beta_d"]),
            "epsilon_t": float(own["epsilon_t"]),
        }
        param = {
            "_target_": "diffusionlab.interop.schedules.VPPrecond",
            "_partial_": True,
            "M": int(own["M"]),
        }
    else:
        base = {
            "_target_": "diffusionlab.diffusion.schedules.VESchedule",
            "sigma_min": float(own["sigma_min"]),
            "sigma_max": float(own["sigma_max"]),
        }
        param = {"_target_": "diffusionlab.interop.schedules.VEPrecond", "_partial_": True}
    schedule = {
        "_target_": "diffusionlab.interop.schedules.SigmaRange",
        "base": base,
        "sigma_min": EDM_SIGMA_MIN,
        "sigma_max": EDM_SIGMA_MAX,
    }
    return schedule, param


def _vae(encoder: Any, where: str) -> dict[str, Any] | None:
    """The VAE an edm2 latent model decodes through: its name and EDM2's latent scale and bias."""
    if encoder is None:
        return None
    if not isinstance(encoder, PersistentRecord):
        raise CheckpointError(f"{where}: 'encoder' is not an edm2 encoder record")
    if encoder.class_name == "StandardRGBEncoder":
        return None
    if encoder.class_name != "StabilityVAEEncoder":
        raise CheckpointError(f"{where}: encoder {encoder.class_name!r} is not supported")
    kw = {**VAE_DEFAULTS}
    names = list(VAE_DEFAULTS)
    kw.update(dict(zip(names, _plain(list(encoder.init_args)), strict=False)))
    kw.update({k: v for k, v in _plain(encoder.init_kwargs).items() if k in VAE_DEFAULTS})
    state = encoder.state
    scale = _plain(state["scale"]) if "scale" in state else None
    bias = _plain(state["bias"]) if "bias" in state else None
    if scale is None or bias is None:  # StabilityVAEEncoder.__init__ in float32
        import numpy as np

        s = np.float32(kw["final_std"]) / np.float32(kw["raw_std"])
        scale = s.tolist()
        bias = (np.float32(kw["final_mean"]) - np.float32(kw["raw_mean"]) * s).tolist()
    return {"name": str(state.get("vae_name", kw["vae_name"])), "scale": scale, "bias": bias}
