"""Does a text-conditioned model draw what it is asked for? (docs/conditioning.md)

Each labelled prompt (``<label><TAB><prompt>``, e.g. ``7<TAB>a handwritten seven``) is sampled
with the same seeds at every guidance weight; the project's domain classifier (the MNIST
classifier of evaluation/train_extractor.py) names the class of every sample, and the accuracy
is the fraction whose top class is the prompt's label: overall, per label and per prompt. The
prompts default to every wording of the captioned MNIST (``data/captions.py`` TEMPLATES) for
each digit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusionlab.data.captions import TEMPLATES, digit_caption
from diffusionlab.evaluation.extractors import DomainClassifier
from diffusionlab.evaluation.recognition import classify
from diffusionlab.sampling.generator import DiffusionGenerator
from diffusionlab.sampling.prompts import Prompt


def digit_prompts(templates: Sequence[str] = TEMPLATES) -> list[Prompt]:
    """Every wording of ``templates`` for the digits 0..9, labelled with the digit."""
    return [Prompt(digit_caption(t, k), k) for k in range(10) for t in templates]


@torch.no_grad()
def sample_prompts(
    generator: DiffusionGenerator,
    prompts: Sequence[Prompt],
    seeds: Sequence[int],
    batch_size: int = 256,
) -> Tensor:
    """``[len(prompts) * len(seeds), ...]`` images in [-1, 1] (CPU): every seed for prompt 0,
    then for prompt 1, ... (a grid with ``len(seeds)`` columns has one row per prompt)."""
    seeds = list(seeds)
    out = []
    for p in prompts:
        for start in range(0, len(seeds), batch_size):
            out.append(generator.generate(seeds[start : start + batch_size], p.text).cpu())
    return torch.cat(out)


@dataclass(frozen=True)
class PromptAccuracy:
    """Accuracy of one guidance weight: overall, per label, per prompt."""

    overall: float
    per_label: dict[int, float]
    per_prompt: dict[str, float]

    def as_dict(self) -> dict:
        return {
            "accuracy": self.overall,
            "per_label": {str(k): v for k, v in self.per_label.items()},
            "per_prompt": self.per_prompt,
        }


def prompt_accuracy(
    classifier: DomainClassifier,
    resolution: int,
    images: Tensor,
    prompts: Sequence[Prompt],
    per_prompt: int,
) -> PromptAccuracy:
    """The accuracy of ``images`` laid out as :func:`sample_prompts` does (``per_prompt`` seeds
    per prompt); every prompt needs a label."""
    if any(p.label is None for p in prompts):
        raise ValueError("prompt accuracy needs a label per prompt (<label><TAB><prompt>)")
    _, top = classify(classifier, images, resolution)
    labels = torch.tensor([p.label for p in prompts]).repeat_interleave(per_prompt)
    right = (top == labels).float()
    by_prompt = right.view(len(prompts), per_prompt).mean(1)
    per_label = {int(k): right[labels == k].mean().item() for k in sorted(set(labels.tolist()))}
    return PromptAccuracy(
        right.mean().item(),
        per_label,
        {p.text: by_prompt[i].item() for i, p in enumerate(prompts)},
    )
