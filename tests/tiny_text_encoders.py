"""Tiny randomly initialised transformers text encoders written to a folder with
``save_pretrained`` (model + a word-level tokenizer): what a user's local CLIP / T5 folder holds,
built offline in milliseconds."""

from __future__ import annotations

from pathlib import Path

from diffusionlab.data.captions import DIGIT_WORDS, TEMPLATES

SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def vocabulary() -> list[str]:
    words = {w for t in TEMPLATES for w in t.replace("{w}", "").replace("{d}", "").split()}
    return SPECIAL + sorted(words | set(DIGIT_WORDS) | {str(d) for d in range(10)} | {"ink"})


def save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    fast.save_pretrained(folder)


def tiny_clip(folder: Path, hidden: int = 16) -> Path:
    """A 2-layer CLIPTextModel of width ``hidden`` and its tokenizer in ``folder``."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(vocabulary()),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    CLIPTextModel(config).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def tiny_t5(folder: Path, hidden: int = 16) -> Path:
    """A 2-layer T5EncoderModel of width ``hidden`` and its tokenizer in ``folder``."""
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(vocabulary()),
        d_model=hidden,
        d_kv=8,
        d_ff=2 * hidden,
        num_layers=2,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=3,
    )
    T5EncoderModel(config).save_pretrained(folder)
    save_tokenizer(folder)
    return folder
