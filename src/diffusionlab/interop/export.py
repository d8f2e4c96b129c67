"""A self-contained model folder: safetensors weights, the resolved config and a model card.

``<dest>/model.safetensors``   the network's weights (one EMA profile, or the raw weights)
``<dest>/decoder.safetensors`` a latent model's decoder (only for latent runs)
``<dest>/config.yaml``         ``hparams``: model / schedule / parameterization / loss / ema /
                               data_shape / label_dim / sampler / latent, as ``DiffusionModule``
                               takes them; ``info``: where it came from, steps, data, FID
``<dest>/README.md``           the model card

:func:`read_export` needs neither Lightning nor this project's training code: hydra's
``instantiate`` on ``hparams`` builds the network, schedule and parameterization
(:func:`diffusionlab.interop.model.build_denoiser`).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from diffusionlab.errors import CheckpointError, ConfigError
from diffusionlab.interop.model import Pretrained

FORMAT = "diffusionlab-export"
VERSION = 1
WEIGHTS = "model.safetensors"
DECODER = "decoder.safetensors"
CONFIG = "config.yaml"
CARD = "README.md"


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is an exported folder (or its ``model.safetensors``)."""
    p = Path(path).expanduser()
    if p.is_file() and p.name == WEIGHTS:
        p = p.parent
    return p.is_dir() and (p / CONFIG).is_file() and (p / WEIGHTS).is_file()


def export_dir(path: str | Path) -> Path:
    p = Path(path).expanduser()
    return p.parent if p.is_file() and p.name == WEIGHTS else p


def _read_config(path: str | Path, key: str) -> dict[str, Any]:
    root = export_dir(path)
    where = f"{key}={str(path)!r}"
    if not is_export(root):
        raise CheckpointError(f"{where} is not an exported model folder ({CONFIG} + {WEIGHTS})")
    try:
        config = OmegaConf.to_container(OmegaConf.load(root / CONFIG))
    except Exception as e:  # yaml errors come in several types
        raise CheckpointError(f"{where}: {CONFIG} does not parse ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{where}: {CONFIG} is not a {FORMAT} config")
    if int(config.get("version", 0)) > VERSION:
        raise CheckpointError(
            f"{where} was written by a newer diffusionlab (format version {config['version']})"
        )
    return config


def read_export_info(path: str | Path, key: str = "ckpt") -> dict[str, Any]:
    """The ``info`` an exported folder records (no weights read)."""
    return dict(_read_config(path, key).get("info") or {})


def read_export(path: str | Path, key: str = "ckpt") -> Pretrained:
    """The model in an exported folder (``path`` may also be its ``model.safetensors``)."""
    root, where = export_dir(path), f"{key}={str(path)!r}"
    config = _read_config(path, key)
    try:
        net = load_file(root / WEIGHTS)
        decoder = load_file(root / DECODER) if (root / DECODER).is_file() else None
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{where}: the weights do not read ({e})") from None
    info = {**(config.get("info") or {}), "source": where, "dir": str(root)}
    return Pretrained(config["hparams"], net, info, decoder)


def write_export(model: Pretrained, dest: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` to the folder ``dest``; an existing non-empty ``dest`` needs ``overwrite``."""
    dest = Path(dest).expanduser()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not overwrite:
        raise ConfigError(
            f"dest={str(dest)!r} exists and is not empty (overwrite=true replaces it)"
        )
    dest.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "version": str(VERSION)}
    save_file(_contiguous(model.net_state), dest / WEIGHTS, metadata=meta)
    if model.decoder_state:
        save_file(_contiguous(model.decoder_state), dest / DECODER, metadata=meta)
    elif (dest / DECODER).exists():
        (dest / DECODER).unlink()
    info = {k: v for k, v in model.info.items() if k not in ("source", "dir")}
    config = {"format": FORMAT, "version": VERSION, "hparams": model.hparams, "info": info}
    (dest / CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.create(_yaml_safe(config))))
    (dest / CARD).write_text(model_card(model))
    return dest


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def _yaml_safe(v: Any) -> Any:
    """Plain dicts (string keys) and lists, as OmegaConf writes them."""
    if isinstance(v, dict):
        return {str(k): _yaml_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_yaml_safe(x) for x in v]
    return v


# ----------------------------------------------------------------------------- from a training run
def from_checkpoint(
    path: str | Path, weights: str | float = "ema", key: str = "ckpt"
) -> Pretrained:
    """The model of a train.py checkpoint: ``weights`` = ``ema`` (the sampling EMA), ``raw`` (the
    trained weights) or a ``sigma_rel`` of an ``ema=power`` run's profiles."""
    from diffusionlab.training.checkpoint_io import read_checkpoint

    state = read_checkpoint(path, key)
    hparams = _plain(state["hyper_parameters"])
    sd = state["state_dict"]
    prefix, ema = _weights_prefix(hparams, weights)
    hparams["ema"] = ema
    net = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if not net:
        raise CheckpointError(f"{key}={str(path)!r} holds no {prefix}* weights")
    decoder = {k[len("decoder.") :]: v for k, v in sd.items() if k.startswith("decoder.")}
    info: dict[str, Any] = {
        "format": "diffusionlab",
        "file": Path(path).name,
        "weights": weights,
        "global_step": int(state.get("global_step", 0)),
        "sample_dtype": "float32",
    }
    info.update(_run_record(Path(path)))
    return Pretrained(hparams, net, info, decoder or None)


def _weights_prefix(hparams: dict, weights: str | float) -> tuple[str, dict]:
    """The state_dict prefix of the chosen weights and the ema config that describes them."""
    ema = dict(hparams.get("ema") or {})
    if weights == "raw":
        return "denoiser.net.", ema
    rels = [float(s) for s in ema.get("sigma_rels") or []]
    if weights == "ema":
        index = 0
    else:
        try:
            value = float(weights)
        except (TypeError, ValueError):
            raise ConfigError(
                f"weights={weights!r}: use ema, raw or a sigma_rel of the run's ema.sigma_rels"
            ) from None
        matches = [i for i, s in enumerate(rels) if math.isclose(s, value, rel_tol=1e-9)]
        if not matches:
            raise ConfigError(
                f"weights={weights!r} is not one of the run's EMA profiles (ema.sigma_rels={rels})"
            )
        index = matches[0]
    if rels:  # keep only the exported profile, with no snapshots
        ema.update(sigma_rels=[rels[index]], snapshot_every=0, snapshot_dir=None)
    return ("ema.net." if index == 0 else f"ema_profiles.{index - 1}.net."), ema


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def _run_record(ckpt: Path) -> dict[str, Any]:
    """The training data (``<run>/.hydra/config.yaml``) and the last FID the run logged
    (``<run>/metrics.csv``, column ``eval/fid``) beside a checkpoint, where present."""
    out: dict[str, Any] = {}
    for run in ckpt.resolve().parents[:3]:
        config = run / ".hydra" / "config.yaml"
        if config.is_file():
            cfg = OmegaConf.load(config)
            if "dataset" in cfg:
                try:
                    out["dataset"] = OmegaConf.to_container(cfg.dataset, resolve=True)
                except Exception:  # an interpolation that no longer resolves
                    out["dataset"] = OmegaConf.to_container(cfg.dataset, resolve=False)
            out["run"] = str(run)
            fid = _last_fid(run / "metrics.csv")
            if fid is not None:
                out["fid"] = fid
            break
    return out


def _last_fid(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    last = None
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("eval/fid"):
                last = {"value": float(row["eval/fid"]), "step": int(float(row.get("step") or 0))}
    return last if last is None else {**last, "source": "training run metrics.csv (eval/fid)"}


def add_metrics(model: Pretrained, path: str | Path) -> None:
    """Record an ``evaluate.py`` result (its ``metrics.json``) in the model's info."""
    p = Path(path).expanduser()
    try:
        result = json.loads(p.read_text())
        metrics = dict(result["metrics"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"metrics={str(path)!r} is not an evaluate.py metrics.json ({e})"
        ) from None
    record = {"metrics": metrics, "num_samples": result.get("num_samples")}
    for k in ("sampler", "dataset", "extractor", "split", "guide_ckpt"):
        if result.get(k) is not None:
            record[k] = result[k]
    model.info["evaluation"] = record


# ----------------------------------------------------------------------------- model card
def model_card(model: Pretrained) -> str:
    """A short README: what the model is, what it was trained on, for how long, how good."""
    h, info = model.hparams, model.info
    name = info.get("file", "model")
    lines = [f"# {name}", ""]
    lines.append(
        "A diffusion model exported by diffusionlab (`dl-export`): `model.safetensors` holds the "
        f"network ({_target(h['model'])}), `config.yaml` the configuration that rebuilds it."
    )
    lines += ["", "| | |", "|---|---|"]
    rows = [
        ("network", f"{_target(h['model'])}, {_count(model.net_state)} parameters"),
        ("data shape", " x ".join(str(d) for d in h["data_shape"])),
        ("classes", h.get("label_dim") or "unconditional"),
        ("schedule", _target(h["schedule"])),
        ("parameterization", _target(h["parameterization"])),
        ("weights", _weights_line(info, h)),
        ("source", f"{info.get('format', '?')} `{info.get('file', '?')}`"),
    ]
    if info.get("global_step"):
        rows.append(("training steps", info["global_step"]))
    if info.get("kimg") is not None:
        rows.append(("training images", f"{info['kimg']} thousand"))
    rows.append(("training data", _data_line(info.get("dataset"))))
    if h.get("latent"):
        rows.append(("latents", "decoded by decoder.safetensors (the run's autoencoder)"))
    if info.get("vae"):
        rows.append(("latents", f"decoded through the diffusers VAE `{info['vae']['name']}`"))
    fid = info.get("fid")
    rows.append(("FID (training run)", f"{fid['value']:.4g} at step {fid['step']}" if fid else "—"))
    ev = info.get("evaluation")
    if ev:
        m = ", ".join(f"{k} {v:.4g}" for k, v in ev["metrics"].items() if isinstance(v, float))
        smp = ev.get("sampler") or {}
        rows.append(
            (
                "evaluate.py",
                f"{m} ({ev.get('num_samples')} samples, {smp.get('name')} NFE {smp.get('nfe')})",
            )
        )
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += [
        "",
        "```bash",
        f"python sample.py ckpt=<this folder> sampler={h['sampler']['name']} "
        f"sampler.nfe={h['sampler']['nfe']}",
        "python evaluate.py ckpt=<this folder> dataset=<name> eval=inception",
        "```",
        "",
        "Without diffusionlab's training code: `diffusionlab.interop.export.read_export(folder)` "
        "and `diffusionlab.interop.model.build_denoiser(model)` give `D(x; sigma)`.",
        "",
    ]
    return "\n".join(lines)


def _target(cfg: dict) -> str:
    return str(cfg.get("_target_", "?")).rsplit(".", 1)[-1]


def _count(state: dict[str, torch.Tensor]) -> str:
    return f"{sum(v.numel() for v in state.values()):,}"


def _weights_line(info: dict, h: dict) -> str:
    ema = h.get("ema") or {}
    if info.get("weights") == "raw":
        return "raw (no EMA)"
    if info.get("ema_std") is not None:
        return f"post-hoc EMA, sigma_rel {info['ema_std']}"
    if "sigma_rels" in ema:
        return f"power EMA, sigma_rel {ema['sigma_rels'][0]}"
    if "halflife_kimg" in ema:
        recorded = "" if info.get("format") != "nvlabs/edm" else " (EDM's default; not recorded)"
        return f"EMA, half-life {ema['halflife_kimg']} kimg{recorded}"
    if "decay" in ema:
        return f"EMA, decay {ema['decay']}"
    return "EMA"


def _data_line(dataset: dict | None) -> str:
    if not dataset:
        return "not recorded"
    target = dataset.get("_target_") or dataset.get("class_name") or "?"
    where = dataset.get("path") or dataset.get("root")
    parts = [f"`{target}`"]
    if where:
        parts.append(f"from `{where}`")
    if dataset.get("resolution"):
        parts.append(f"at {dataset['resolution']}x{dataset['resolution']}")
    return " ".join(parts)
