"""Projectors: image tokens from the encoder's space into the LLM's embedding space.

Factory contract: ``factory(in_dim=, out_dim=, num_tokens=, **extra) -> nn.Module`` mapping
``[B, N, in_dim] -> [B, M, out_dim]``. A projector that keeps its input tokens' 2-D layout says so in
``token_grid(grid)`` (the per-token ones here); without it the output tokens have none (fusion.cells leaves them
unnamed). A factory that declares a ``text_norm`` parameter is given the LLM's mean input-embedding norm (see
``out_norm``).

``out_norm`` (every built-in): ``null`` (LLaVA: the projector's output as it comes) or ``text``: an RMSNorm on each
output token whose gain starts at the LLM's mean text-embedding norm, so image tokens enter the LLM at the scale of
its text tokens and keep a learnt gain. Without it the default's projector learns image tokens about 90x longer than
text embeddings (norm 115 against 1.24 after align), and the LLM can no longer write into their residual stream
(docs/toyworld.md, "Image tokens at the text's norm").
"""
from __future__ import annotations

import math

import torch
from torch import nn

OUT_NORMS = ("text",)


class OutputNorm(nn.Module):
    """RMSNorm per token, its gain initialised so every token starts at L2 norm ``target``."""

    def __init__(self, dim: int, target: float) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        with torch.no_grad():
            self.norm.weight.fill_(target / math.sqrt(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, M, D] -> [B, M, D], each token at the gain's norm
        return self.norm(x)


def output_norm(name: str, out_dim: int, out_norm: object, text_norm: float | None) -> OutputNorm | None:
    """The ``out_norm`` module of projector ``name`` (None when the recipe asks for none).

    ``text_norm`` is None where vlkit builds the projector without an LLM (to count image tokens); the gain then
    starts at 1 per dimension, and a trained run's checkpoint sets it anyway."""
    if out_norm is None:
        return None
    if out_norm not in OUT_NORMS:
        raise ValueError(f"projector '{name}': out_norm must be null (LLaVA) or 'text' (image tokens at the LLM's "
                         f"text-embedding norm); got {out_norm!r}")
    target = math.sqrt(out_dim) if text_norm is None else float(text_norm)
    if not math.isfinite(target) or target <= 0:
        raise ValueError(f"projector '{name}': out_norm 'text' needs the LLM's text-embedding norm > 0, got {target}")
    return OutputNorm(out_dim, target)

from vlkit.registry import register_projector


class LinearProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, out_norm: OutputNorm | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.out_norm = out_norm  # None registers nothing: checkpoints without it load as before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, N, in_dim] -> [B, N, out_dim]
        x = self.proj(x)
        return x if self.out_norm is None else self.out_norm(x)

    def token_grid(self, grid: tuple[int, int] | None) -> tuple[int, int] | None:
        return grid  # one output token per input token, in the same order


class MLPProjector(nn.Module):
    """``depth`` linear layers with GELU between them; depth 2 is LLaVA-1.5's ``mlp2x_gelu``."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, hidden_dim: int | None = None,
                 out_norm: OutputNorm | None = None) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"projector 'mlp' needs depth >= 1, got {depth}")
        hidden = hidden_dim or out_dim
        dims = [in_dim] + [hidden] * (depth - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(depth):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(dims[i], dims[i + 1]))
        self.net = nn.Sequential(*layers)
        self.out_norm = out_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, N, in_dim] -> [B, N, out_dim]
        x = self.net(x)
        return x if self.out_norm is None else self.out_norm(x)

    def token_grid(self, grid: tuple[int, int] | None) -> tuple[int, int] | None:
        return grid  # one output token per input token, in the same order


class CrossAttentionProjector(nn.Module):
    """``num_tokens`` learned queries cross-attend to the image tokens (Perceiver resampler / Q-Former style)."""

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int, depth: int = 1, num_heads: int = 4,
                 mlp_ratio: float = 2.0, out_norm: OutputNorm | None = None) -> None:
        super().__init__()
        if out_dim % num_heads:
            raise ValueError(f"projector 'cross_attention': out_dim {out_dim} is not divisible by num_heads {num_heads}")
        self.queries = nn.Parameter(torch.randn(num_tokens, out_dim) * out_dim**-0.5)
        self.kv_norm = nn.LayerNorm(in_dim)
        self.kv_proj = nn.Linear(in_dim, out_dim)
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleDict({
                "q_norm": nn.LayerNorm(out_dim),
                "attn": nn.MultiheadAttention(out_dim, num_heads, batch_first=True),
                "ffn_norm": nn.LayerNorm(out_dim),
                "ffn": nn.Sequential(nn.Linear(out_dim, int(out_dim * mlp_ratio)), nn.GELU(),
                                     nn.Linear(int(out_dim * mlp_ratio), out_dim)),
            }))
        self.out_norm = nn.LayerNorm(out_dim)
        if out_norm is not None:  # out_norm 'text': this LayerNorm's gain starts where OutputNorm's would
            with torch.no_grad():
                self.out_norm.weight.copy_(out_norm.norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, N, in_dim] -> [B, num_tokens, out_dim]
        kv = self.kv_proj(self.kv_norm(x))
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        for layer in self.layers:
            q = q + layer["attn"](layer["q_norm"](q), kv, kv, need_weights=False)[0]
            q = q + layer["ffn"](layer["ffn_norm"](q))
        return self.out_norm(q)


class ClsReshapeProjector(nn.Module):
    """One vector -> ``Linear(in, num_tokens * out)`` -> ``num_tokens`` tokens (CLS-only with several tokens)."""

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int, depth: int = 1,
                 out_norm: OutputNorm | None = None) -> None:
        super().__init__()
        self.num_tokens, self.out_dim = num_tokens, out_dim
        self.out_norm = out_norm
        layers: list[nn.Module] = []
        for i in range(depth - 1):
            layers += [nn.Linear(in_dim if i == 0 else out_dim, out_dim), nn.GELU()]
        layers.append(nn.Linear(in_dim if depth == 1 else out_dim, num_tokens * out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, 1, in_dim] -> [B, num_tokens, out_dim]
        if x.shape[1] != 1:
            raise ValueError(
                f"projector 'cls_reshape' expects one input token per image, got {x.shape[1]}; "
                "use tokens.name=cls (or pooled with num_tokens=1)"
            )
        x = self.net(x[:, 0]).view(x.shape[0], self.num_tokens, self.out_dim)
        return x if self.out_norm is None else self.out_norm(x)


def _need_tokens(name: str, num_tokens: int | None) -> int:
    if num_tokens is None or num_tokens < 1:
        raise ValueError(f"projector '{name}' needs projector.num_tokens >= 1 (the number of output tokens)")
    return num_tokens


@register_projector("linear")
def linear(in_dim: int, out_dim: int, num_tokens: int | None = None, out_norm: str | None = None,
           text_norm: float | None = None) -> nn.Module:
    """One linear map per token (LLaVA-1)."""
    return LinearProjector(in_dim, out_dim, output_norm("linear", out_dim, out_norm, text_norm))


@register_projector("mlp")
def mlp(in_dim: int, out_dim: int, num_tokens: int | None = None, depth: int = 2,
        hidden_dim: int | None = None, out_norm: str | None = None, text_norm: float | None = None) -> nn.Module:
    """MLP with GELU per token; depth 2 = LLaVA-1.5 ``mlp2x_gelu``."""
    return MLPProjector(in_dim, out_dim, depth=depth, hidden_dim=hidden_dim,
                        out_norm=output_norm("mlp", out_dim, out_norm, text_norm))


@register_projector("cross_attention")
def cross_attention(in_dim: int, out_dim: int, num_tokens: int | None = None, depth: int = 1,
                    num_heads: int = 4, mlp_ratio: float = 2.0, out_norm: str | None = None,
                    text_norm: float | None = None) -> nn.Module:
    """Learned queries resample any number of image tokens to ``num_tokens``; ends in a LayerNorm, whose gain
    ``out_norm: text`` starts at the text's norm."""
    return CrossAttentionProjector(in_dim, out_dim, _need_tokens("cross_attention", num_tokens), depth=depth,
                                   num_heads=num_heads, mlp_ratio=mlp_ratio,
                                   out_norm=output_norm("cross_attention", out_dim, out_norm, text_norm))


@register_projector("cls_reshape")
def cls_reshape(in_dim: int, out_dim: int, num_tokens: int | None = None, depth: int = 1,
                out_norm: str | None = None, text_norm: float | None = None) -> nn.Module:
    """One (CLS) vector expanded to ``num_tokens`` tokens by a linear map."""
    return ClsReshapeProjector(in_dim, out_dim, _need_tokens("cls_reshape", num_tokens), depth=depth,
                               out_norm=output_norm("cls_reshape", out_dim, out_norm, text_norm))
