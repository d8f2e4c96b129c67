"""Prompts as the apps take them (``prompt=``, ``prompts_file=``, ``negative_prompt=``), checked
against the model's condition kind once, with messages naming the key (docs/conditioning.md).

A prompts file holds one prompt per line; blank lines and lines starting with ``#`` are skipped.
A line ``<label><TAB><prompt>`` also names what the prompt should show (an integer class, e.g.
the digit), which ``dl-prompt-accuracy`` checks with the domain classifier."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffusionlab.errors import ConfigError
from diffusionlab.sampling.conditioning import Condition, TextPrompts


@dataclass(frozen=True)
class Prompt:
    """A prompt and, from a labelled prompts file, the class it asks for."""

    text: str
    label: int | None = None


def kind_of(condition: Condition | None) -> str:
    """How a message names a model's condition."""
    if condition is None:
        return "unconditional"
    if condition.kind == "class":
        return f"class-conditional (label_dim={condition.num_classes})"
    return f"conditioned on {condition.kind} (cond={condition.kind})"


def read_prompts_file(path: str | Path, key: str = "prompts_file") -> list[Prompt]:
    """The prompts of ``path`` (``[label<TAB>]prompt`` per line)."""
    p = Path(str(path)).expanduser()
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}={str(path)!r} does not read ({e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        label, tab, text = line.partition("\t")
        if not tab:
            out.append(Prompt(line.strip()))
            continue
        try:
            out.append(Prompt(text.strip(), int(label)))
        except ValueError:
            raise ConfigError(
                f"{key}={str(path)!r} line {n}: {label!r} before the tab is not an integer label"
            ) from None
    if not out:
        raise ConfigError(f"{key}={str(path)!r} holds no prompts")
    return out


def requested_prompts(
    condition: Condition | None, prompt: str | None, prompts_file: str | None
) -> list[Prompt] | None:
    """The prompts a job asked for (None: none asked; a text model then draws its own
    ``cond.prompts``). Prompts for a model that does not read text, or a text model with nothing
    to prompt it with, stop with a message naming the key."""
    if prompt is not None and prompts_file:
        raise ConfigError("give prompt=... or prompts_file=..., not both")
    asked = "prompt" if prompt is not None else "prompts_file" if prompts_file else None
    is_text = isinstance(condition, TextPrompts)
    if asked is None:
        if is_text and not condition.prompts:
            raise ConfigError(
                "the ckpt is text-conditioned (cond=text) and stores no cond.prompts to draw "
                'from: give prompt="..." or prompts_file=<one prompt per line>'
            )
        return None
    if not is_text:
        raise ConfigError(
            f"{asked}=... needs a text-conditioned ckpt (cond=text); it is {kind_of(condition)}"
        )
    if prompt is not None:
        return [Prompt(str(prompt))]
    return read_prompts_file(prompts_file)


def check_negative(
    condition: Condition | None, negative: str | None, guidance: float, guided: bool
) -> None:
    """A negative prompt replaces the empty prompt as CFG's baseline: it needs a text model,
    classifier-free guidance (guidance != 1) and no guide_ckpt."""
    if negative is None:
        return
    if not isinstance(condition, TextPrompts):
        raise ConfigError(
            f"negative_prompt=... needs a text-conditioned ckpt (cond=text); it is {kind_of(condition)}"
        )
    if guided:
        raise ConfigError(
            "negative_prompt=... is classifier-free guidance's baseline; with guide_ckpt "
            "(autoguidance) the guide is the baseline: drop one of them"
        )
    if guidance == 1.0:
        raise ConfigError("negative_prompt=... acts through guidance: set guidance != 1 (e.g. 3)")
