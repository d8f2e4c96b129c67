"""``dl-prompt-accuracy ckpt=...``: how often a text-conditioned model's samples are the class
its prompt asks for, per guidance weight (evaluation/prompt_accuracy.py; docs/conditioning.md)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from diffusionlab.checks import number, sampler_numbers
from diffusionlab.cli.common import plain, run_cli, user_errors_exit
from diffusionlab.config import CONF_DIR
from diffusionlab.errors import ConfigError
from diffusionlab.evaluation.evaluator import domain_extractor
from diffusionlab.evaluation.prompt_accuracy import digit_prompts, prompt_accuracy, sample_prompts
from diffusionlab.evaluation.reference import load_dataset
from diffusionlab.files import atomic_write_text
from diffusionlab.sampling.checkpoint import load_module, pick_device
from diffusionlab.sampling.conditioning import TextPrompts
from diffusionlab.sampling.generator import DiffusionGenerator
from diffusionlab.sampling.images import save_samples_png
from diffusionlab.sampling.prompts import check_negative, kind_of, read_prompts_file
from diffusionlab.sampling.spec import SamplerSpec
from diffusionlab.tracking.loggers import finish_wandb_run
from diffusionlab.tracking.wandb_runs import start_wandb_run

log = logging.getLogger(__name__)


def weights_of(cfg: DictConfig) -> list[float]:
    values = plain(cfg.guidance)
    values = values if isinstance(values, list) else [values]
    try:
        return [float(w) for w in values]
    except (TypeError, ValueError):
        raise ConfigError(f"guidance={values!r} must be a number or a list of numbers") from None


def prompt_accuracy_app(cfg: DictConfig) -> dict:
    """Run the job; returns what ``metrics.json`` holds."""
    weights = weights_of(cfg)
    per_prompt = number(cfg, "num_samples", int, at_least=1)
    bs = number(cfg, "batch_size", int, at_least=1)
    sampler_numbers(cfg)
    device = pick_device(cfg.device)
    module = load_module(cfg.ckpt, device)
    spec = SamplerSpec.from_config(cfg.sampler, ckpt=cfg.ckpt)
    spec.check(module.schedule)
    negative = cfg.get("negative_prompt")
    gens = {
        w: DiffusionGenerator.from_module(
            module, spec, w, bool(cfg.use_ema), None, negative=negative
        )
        for w in weights
    }
    condition = gens[weights[0]].condition
    if not isinstance(condition, TextPrompts):
        raise ConfigError(
            f"ckpt={cfg.ckpt!r}: prompt accuracy needs a text-conditioned ckpt (cond=text); "
            f"it is {kind_of(condition)}"
        )
    for w in weights:
        check_negative(condition, negative, w, False)
    prompts = read_prompts_file(cfg.prompts_file) if cfg.prompts_file else digit_prompts()
    unlabelled = [p.text for p in prompts if p.label is None]
    if unlabelled:
        raise ConfigError(
            f"prompts_file={cfg.prompts_file!r}: {unlabelled[0]!r} has no label; write "
            "<label><TAB><prompt> per line"
        )
    data = load_dataset(cfg.extractor_dataset, int(module.hparams.data_shape[-1]))
    ext = domain_extractor(
        data, cfg.extractor_dataset, cfg.cache_dir, int(cfg.extractor_steps), device
    )
    outdir = Path(cfg.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    seeds = range(per_prompt)
    result: dict = {"ckpt": str(cfg.ckpt), "sampler": spec.name, "nfe": spec.nfe, "weights": {}}
    with finish_wandb_run():
        run = start_wandb_run(cfg, [str(cfg.ckpt)])
        for w, gen in gens.items():
            images = sample_prompts(gen, prompts, seeds, bs)
            acc = prompt_accuracy(ext.net, ext.resolution, images, prompts, per_prompt)
            result["weights"][str(w)] = acc.as_dict()
            save_samples_png(images, outdir / f"grid_w{w:g}.png", per_prompt)
            log.info("guidance %g: accuracy %.3f", w, acc.overall)
            run.log({"prompt_accuracy/accuracy": acc.overall, "prompt_accuracy/guidance": w})
        atomic_write_text(outdir / "metrics.json", json.dumps(result, indent=2))
        atomic_write_text(outdir / "accuracy.md", table(result))
    return result


def table(result: dict) -> str:
    """One row per guidance weight: overall accuracy and per digit."""
    weights = result["weights"]
    labels = sorted({k for v in weights.values() for k in v["per_label"]}, key=int)
    head = "| guidance | accuracy | " + " | ".join(labels) + " |"
    rule = "|---" * (len(labels) + 2) + "|"
    rows = [
        f"| {w} | {v['accuracy']:.3f} | "
        + " | ".join(f"{v['per_label'][k]:.2f}" for k in labels)
        + " |"
        for w, v in weights.items()
    ]
    return "\n".join([head, rule, *rows]) + "\n"


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="prompt_accuracy")
@user_errors_exit
def app(cfg: DictConfig) -> None:
    prompt_accuracy_app(cfg)


def main() -> None:
    """``dl-prompt-accuracy``: user errors end as one ``error: ...`` line."""
    run_cli(app, "prompt_accuracy")


if __name__ == "__main__":
    main()
