"""Text encoders: captions -> the network's condition inputs (``networks/context.py``): token
embeddings ``context [B, L, D]`` with ``context_mask [B, L]`` and a pooled ``cond_vector [B, P]``.

- :class:`TrainableTextEncoder` (``cond.encoder.kind=trainable``): a small transformer over
  hashed words, trained with the diffusion model (it lives in the denoiser, so it is saved and
  EMA-averaged with it); meant for experiments on a CPU, no files needed.
- :class:`PretrainedTextEncoder` (``kind=clip`` / ``t5`` / ``auto``): a frozen transformers
  ``CLIPTextModel`` or ``T5EncoderModel`` with its tokenizer, read from a local folder (what
  ``save_pretrained`` writes; nothing is downloaded), its embeddings optionally cached per
  caption. Its weights stay in that folder: checkpoints record the path, not the weights.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffusionlab.errors import ConfigError

log = logging.getLogger(__name__)

ENCODER_KINDS = ("trainable", "clip", "t5", "auto")
_WORDS = re.compile(r"[a-z]+|[0-9]")


@lru_cache(maxsize=65536)
def word_ids(word: str, vocab_size: int) -> tuple[int, int]:
    """Two ids in ``[1, vocab_size)`` from independent hashes of ``word`` (hash embeddings,
    Svenstrup et al. 2017: two words rarely share both)."""
    h = hashlib.blake2b(word.encode(), digest_size=8).digest()
    a, b = int.from_bytes(h[:4], "little"), int.from_bytes(h[4:], "little")
    return 1 + a % (vocab_size - 1), 1 + b % (vocab_size - 1)


class HashedWordTokenizer:
    """Lower-cased words and single digits -> hashed id pairs, at most ``max_length`` words;
    ``(ids [B, L, 2], mask [B, L])`` with id 0 as padding. No vocabulary file: any word has ids."""

    def __init__(self, vocab_size: int = 4096, max_length: int = 16) -> None:
        if vocab_size < 2 or max_length < 1:
            raise ConfigError(
                f"cond.encoder: vocab_size={vocab_size} must be >= 2 and max_length={max_length} >= 1"
            )
        self.vocab_size = vocab_size
        self.max_length = max_length

    def words(self, caption: str) -> list[str]:
        return _WORDS.findall(caption.lower())[: self.max_length]

    def __call__(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        rows = [[word_ids(w, self.vocab_size) for w in self.words(c)] for c in captions]
        ids = torch.zeros(len(captions), self.max_length, 2, dtype=torch.long)
        for i, row in enumerate(rows):
            if row:
                ids[i, : len(row)] = torch.tensor(row)
        return ids, ids[..., 0] > 0


class TrainableTextEncoder(nn.Module):
    """A pre-LN transformer encoder (Vaswani et al. 2017) of ``depth`` layers over hashed word
    embeddings plus learned positions, with a learned first token whose output is the pooled
    embedding (BERT's [CLS]). ``context_dim = vector_dim = width``."""

    def __init__(
        self,
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        vocab_size: int = 4096,
        max_length: int = 16,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ConfigError(f"cond.encoder.width={width} must be divisible by heads={heads}")
        self.tokenizer = HashedWordTokenizer(vocab_size, max_length)
        self.context_dim = self.vector_dim = width
        self.embed = nn.Embedding(vocab_size, width, padding_idx=0)
        self.embed2 = nn.Embedding(vocab_size, width, padding_idx=0)
        self.cls = nn.Parameter(torch.randn(width) * 0.02)
        self.pos = nn.Parameter(torch.randn(max_length + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.embed2.weight, std=0.02)

    def forward(self, ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """``ids [B, L, 2]``, ``mask [B, L]`` -> the condition inputs."""
        b = ids.shape[0]
        tokens = self.embed(ids[..., 0]) + self.embed2(ids[..., 1])
        x = torch.cat([self.cls.expand(b, 1, -1), tokens], dim=1) + self.pos[: ids.shape[1] + 1]
        keep = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        x = self.norm(self.layers(x, src_key_padding_mask=~keep))
        return {"context": x[:, 1:], "context_mask": mask, "cond_vector": x[:, 0]}

    def encode(self, captions: Sequence[str], device: torch.device | str) -> dict[str, Tensor]:
        """Captions -> condition inputs on ``device`` (with gradients when training)."""
        ids, mask = self.tokenizer(captions)
        return self(ids.to(device), mask.to(device))


class PretrainedTextEncoder:
    """A frozen transformers text encoder from the local folder ``path`` (``save_pretrained``'s
    layout: ``config.json``, the weights, the tokenizer files).

    ``kind``: ``clip`` (``CLIPTextModel``: the last hidden states and the pooled output at the
    end token, as Stable Diffusion and unCLIP use them), ``t5`` (``T5EncoderModel``: the hidden
    states, Imagen; pooled = their masked mean), ``auto`` (from ``config.json``'s model type).
    Captions are padded or cut to ``max_length`` tokens. With ``cache`` each caption's
    embeddings are computed once and kept (on the CPU) for the rest of the run.

    Not an ``nn.Module`` of the diffusion model: its weights are not trained, copied into the EMA
    or written to checkpoints; the checkpoint keeps ``path`` and reloads them from there."""

    def __init__(
        self,
        path: str,
        kind: str = "auto",
        max_length: int = 77,
        cache: bool = True,
        key: str = "cond.encoder.path",
    ) -> None:
        folder = Path(str(path)).expanduser()
        self.path, self.key = str(path), key
        if not folder.is_dir():
            raise ConfigError(
                f"{key}={self.path!r} is not a folder (a save_pretrained text encoder)"
            )
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"{key}={self.path!r} has no config.json: not a transformers model folder "
                "(write one with model.save_pretrained(folder) and tokenizer.save_pretrained(folder))"
            )
        if kind not in ENCODER_KINDS[1:]:
            raise ConfigError(f"cond.encoder.kind={kind!r} must be one of {ENCODER_KINDS}")
        try:
            import transformers
        except ImportError:
            raise ConfigError(
                f"cond.encoder.kind={kind} reads a transformers model: pip install "
                "'diffusionlab[text]' (transformers, tokenizers)"
            ) from None
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        try:
            config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        except Exception as e:
            raise ConfigError(
                f"{key}={self.path!r}: config.json does not read ({_first(e)})"
            ) from None
        model_type = str(getattr(config, "model_type", ""))
        if kind == "auto":
            kind = "t5" if "t5" in model_type else "clip" if "clip" in model_type else ""
            if not kind:
                raise ConfigError(
                    f"{key}={self.path!r} holds a {model_type!r} model; text encoders are CLIP "
                    "(CLIPTextModel) or T5 (T5EncoderModel): set cond.encoder.kind"
                )
        cls = transformers.T5EncoderModel if kind == "t5" else transformers.CLIPTextModel
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                folder, local_files_only=True
            )
        except Exception as e:
            raise ConfigError(
                f"{key}={self.path!r}: its tokenizer files do not load ({_first(e)}); "
                "save the tokenizer into the folder with tokenizer.save_pretrained"
            ) from None
        try:
            self.model = cls.from_pretrained(folder, local_files_only=True).eval()
        except Exception as e:
            raise ConfigError(
                f"{key}={self.path!r}: the {cls.__name__} weights do not load ({_first(e)})"
            ) from None
        self.model.requires_grad_(False)
        self.kind = kind
        self.max_length = int(max_length)
        cfg = self.model.config
        self.context_dim = int(getattr(cfg, "hidden_size", None) or cfg.d_model)
        self.vector_dim = self.context_dim
        self.cache: dict[str, tuple[Tensor, Tensor, Tensor]] | None = {} if cache else None

    @property
    def identity(self) -> str:
        """What makes two encoders give the same embeddings (guidance reuses them)."""
        return f"{self.kind}:{Path(self.path).expanduser().resolve()}:{self.max_length}"

    @torch.no_grad()
    def _run(self, captions: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        device = next(self.model.parameters()).device
        enc = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        mask[:, 0] = 1  # an empty caption still has one token to attend to
        out = self.model(input_ids=ids, attention_mask=mask)
        tokens = out.last_hidden_state.float()
        if self.kind == "clip":
            pooled = out.pooler_output.float()
        else:
            m = mask[..., None].float()
            pooled = (tokens * m).sum(1) / m.sum(1)
        return tokens, mask.bool(), pooled

    def encode(self, captions: Sequence[str], device: torch.device | str) -> dict[str, Tensor]:
        """Captions -> condition inputs on ``device`` (the model runs on the first device it
        is asked for)."""
        device = torch.device(device)
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        captions = [str(c) for c in captions]
        if self.cache is None:
            tokens, mask, pooled = self._run(captions)
        else:
            missing = list(dict.fromkeys(c for c in captions if c not in self.cache))
            if missing:
                t, m, p = self._run(missing)
                for i, c in enumerate(missing):
                    self.cache[c] = (t[i].cpu(), m[i].cpu(), p[i].cpu())
            rows = [self.cache[c] for c in captions]
            tokens, mask, pooled = (torch.stack(r) for r in zip(*rows, strict=True))
        return {
            "context": tokens.to(device),
            "context_mask": mask.to(device),
            "cond_vector": pooled.to(device),
        }


TextEncoder = TrainableTextEncoder | PretrainedTextEncoder


def build_text_encoder(cfg: dict[str, Any]) -> TextEncoder:
    """The encoder of ``cond.encoder`` (``kind`` and its settings)."""
    cfg = dict(cfg)
    kind = cfg.pop("kind", "trainable")
    if kind not in ENCODER_KINDS:
        raise ConfigError(f"cond.encoder.kind={kind!r} must be one of {ENCODER_KINDS}")
    if kind == "trainable":
        known = ("width", "depth", "heads", "vocab_size", "max_length")
        return TrainableTextEncoder(**{k: int(cfg[k]) for k in known if cfg.get(k) is not None})
    if not cfg.get("path"):
        raise ConfigError(
            f"cond.encoder.kind={kind} needs cond.encoder.path: a local folder holding the "
            "pretrained text encoder and its tokenizer (save_pretrained)"
        )
    return PretrainedTextEncoder(
        str(cfg["path"]), kind, int(cfg.get("max_length") or 77), bool(cfg.get("cache", True))
    )


def _first(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
