"""DINOv2 vision transformers (Oquab et al. 2023) read from a local weights file.

The architecture is the one ``torch.hub.load("facebookresearch/dinov2", "dinov2_vit{s,b,l,g}14")``
builds (and torch-fidelity's DINOv2 extractor loads): pre-LN ViT blocks with LayerScale, patch
14, position embeddings for 518 px bicubically resized to the input, registers for the ``_reg``
models. It is written here so that the official files (``dinov2_vitl14_pretrain.pth``, the file
``torch.hub`` caches) load with their own keys and nothing is fetched at run time;
``tests/networks/test_dinov2.py`` compares it with the reference code when ``DL_DINOV2_PATH``
points at a checkout of facebookresearch/dinov2.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusionlab.errors import ConfigError

URL = "https://dl.fbaipublicfiles.com/dinov2"
#: embed dim -> (size letter, heads); the hub models use 64 channels per head
SIZES = {384: ("s", 6), 768: ("b", 12), 1024: ("l", 16), 1536: ("g", 24)}


def weights_url(name: str) -> str:
    """Download address of an official file, e.g. ``dinov2_vitl14_pretrain.pth``."""
    model = name.split("_reg")[0].removesuffix("_pretrain.pth")
    return f"{URL}/{model}/{name}"


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """ViT-g's feed-forward: silu(x W1) * (x W2), then W3 (``w12`` holds W1 and W2)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, swiglu: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = (SwiGLU if swiglu else Mlp)(dim, 4 * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DINOv2(nn.Module):
    """``forward(x)`` -> the normalised class token ``[B, dim]`` (the hub model's output, what
    FD-DINOv2 uses); :meth:`features` -> ``(class token, patch tokens [B, h*w, dim])``. ``x`` is
    an ImageNet-normalised RGB batch whose sides are multiples of ``patch``."""

    def __init__(
        self,
        dim: int = 1024,
        depth: int = 24,
        heads: int = 16,
        patch: int = 14,
        img_size: int = 518,
        registers: int = 0,
        swiglu: bool = False,
    ) -> None:
        super().__init__()
        self.dim, self.patch, self.registers = dim, patch, registers
        grid = img_size // patch
        self.patch_embed = PatchEmbed(dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim)) if registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # unused at inference; in the files
        self.blocks = nn.ModuleList(Block(dim, heads, swiglu) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        # the hub's settings: registers came with antialiased, offset-free resizing
        self.interpolate_antialias = bool(registers)
        self.interpolate_offset = 0.0 if registers else 0.1

    def position_embedding(self, rows: int, cols: int) -> Tensor:
        """The 518 px position table resized to a ``rows x cols`` token grid as the hub code does
        (bicubic, with its +0.1 scale offset for the models without registers)."""
        n = self.pos_embed.shape[1] - 1
        if n == rows * cols and rows == cols:
            return self.pos_embed
        m = math.isqrt(n)
        pos = self.pos_embed.float()
        table = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            off = self.interpolate_offset
            kwargs: dict = {"scale_factor": ((rows + off) / m, (cols + off) / m)}
        else:
            kwargs = {"size": (rows, cols)}
        table = F.interpolate(table, mode="bicubic", antialias=self.interpolate_antialias, **kwargs)
        table = table.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])
        return torch.cat([pos[:, :1], table], dim=1).to(self.pos_embed.dtype)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(normalised class token ``[B, dim]``, normalised patch tokens ``[B, h*w, dim]``)."""
        b, _, hgt, wid = x.shape
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(hgt // self.patch, wid // self.patch)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(b, -1, -1)
            tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        return tokens[:, 0], tokens[:, 1 + self.registers :]

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)[0]

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> DINOv2:
        """The model whose shapes the official state dict ``state`` has, with its weights."""
        dim = int(state["cls_token"].shape[-1])
        if dim not in SIZES:
            raise ValueError(f"no DINOv2 ViT has width {dim} (expected one of {sorted(SIZES)})")
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        patch = int(state["patch_embed.proj.weight"].shape[-1])
        grid = math.isqrt(int(state["pos_embed"].shape[1]) - 1)
        registers = int(state["register_tokens"].shape[1]) if "register_tokens" in state else 0
        model = cls(
            dim=dim,
            depth=depth,
            heads=SIZES[dim][1],
            patch=patch,
            img_size=grid * patch,
            registers=registers,
            swiglu="blocks.0.mlp.w12.weight" in state,
        )
        model.load_state_dict(state)
        return model

    @property
    def size_name(self) -> str:
        """``dinov2-vit-l-14`` etc. (torch-fidelity's names), ``-reg`` with registers."""
        reg = "-reg" if self.registers else ""
        return f"dinov2-vit-{SIZES[self.dim][0]}-{self.patch}{reg}"


EXAMPLE = "dinov2_vitl14_pretrain.pth"
FETCH = f"download {weights_url(EXAMPLE)} (or the vits14 / vitb14 / vitg14 file)"


def dinov2_file(path: str | Path | None, key: str) -> Path:
    """The DINOv2 weights file ``path`` of the setting ``key``; one :class:`ConfigError` naming
    both when it is not set or not there (apps call this before any long work)."""
    if path is None or str(path) in ("", "None"):
        raise ConfigError(f"{key} is not set: {FETCH} and pass {key}=/path/to/{EXAMPLE}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"{key}={str(path)!r}: DINOv2 weights file not found; {FETCH} on a machine with "
            f"internet and put it at {path}"
        )
    return path


def load_dinov2(path: str | Path | None, key: str) -> DINOv2:
    """A frozen eval-mode DINOv2 from an official weights file (``.pth`` as torch.hub caches it,
    or ``.safetensors`` with the same keys). ``key`` names the config setting in the one
    :class:`ConfigError` raised when the file is not set, missing or unreadable."""
    path = dinov2_file(path, key)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        model = DINOv2.from_state_dict(state)
    except Exception as e:
        raise ConfigError(
            f"{key}={str(path)!r} is not a DINOv2 weights file ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); {FETCH}"
        ) from None
    return model.requires_grad_(False).eval()
