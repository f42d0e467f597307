"""Token strategies: which encoder tokens become image tokens.

Every strategy is called as ``strategy(features)`` with an :class:`~vlkit.types.EncoderOutput` and returns
``[B, N', D]``. A strategy that changes the feature dim defines ``out_dim(in_dim)``; one whose tokens keep a 2-D
layout says which in ``token_grid(grid)`` (fusion.cells names grid cells only for such tokens).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.registry import register_token_strategy
from vlkit.types import EncoderOutput


class TokenStrategy(nn.Module):
    """Base class; subclasses implement ``forward``. Strategies have no parameters unless they say so."""

    name = "?"

    def out_dim(self, in_dim: int) -> int:
        return in_dim

    def token_grid(self, grid: tuple[int, int] | None) -> tuple[int, int] | None:
        """The (h, w) row-major layout of this strategy's tokens given the encoder's patch grid; None: no layout."""
        return None

    def _need_cls(self, features: EncoderOutput) -> torch.Tensor:
        if features.cls is None:
            raise ValueError(
                f"token strategy '{self.name}' needs a CLS token or pooled feature, but this encoder gives none "
                "(cls=None); use tokens.name=patch or tokens.name=pooled"
            )
        return features.cls


class ClsTokens(TokenStrategy):
    name = "cls"

    def forward(self, features: EncoderOutput) -> torch.Tensor:
        # cls [B, D] -> [B, 1, D]
        return self._need_cls(features).unsqueeze(1)


class PatchTokens(TokenStrategy):
    name = "patch"

    def token_grid(self, grid: tuple[int, int] | None) -> tuple[int, int] | None:
        return grid

    def forward(self, features: EncoderOutput) -> torch.Tensor:
        # patches [B, N, D] -> [B, N, D]
        return features.patches


class ClsPatchTokens(TokenStrategy):
    name = "cls_patch"

    def forward(self, features: EncoderOutput) -> torch.Tensor:
        # cls [B, D], patches [B, N, D] -> [B, 1 + N, D]
        return torch.cat([self._need_cls(features).unsqueeze(1), features.patches], dim=1)


def _pool_shape(num_tokens: int, name: str = "pooled") -> tuple[int, int]:
    try:
        side = math.isqrt(num_tokens) if num_tokens > 0 else 0
    except TypeError:  # not an integer
        side = 0
    if side < 1 or side * side != num_tokens:
        raise ValueError(f"token strategy '{name}' needs a square num_tokens (1, 4, 9, 16, ...), got {num_tokens}")
    return side, side


class PooledTokens(TokenStrategy):
    """Adaptive average pooling of the patch grid to ``num_tokens`` = s*s cells (64 -> 16 -> 4 -> 1)."""

    name = "pooled"

    def __init__(self, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.shape = _pool_shape(num_tokens)

    def token_grid(self, grid: tuple[int, int] | None) -> tuple[int, int] | None:
        return None if grid is None else self.shape

    def forward(self, features: EncoderOutput) -> torch.Tensor:
        # patches [B, h*w, D] -> [B, num_tokens, D]
        if features.grid is None:
            raise ValueError("token strategy 'pooled' needs an encoder with a 2-D patch grid (grid=None)")
        b, n, d = features.patches.shape
        h, w = features.grid
        x = features.patches.transpose(1, 2).reshape(b, d, h, w)
        x = F.adaptive_avg_pool2d(x, self.shape)
        return x.flatten(2).transpose(1, 2)


class MergedTokens(TokenStrategy):
    """The patch grid merged by concatenation to ``num_tokens`` = s*s tokens, each the k x k block of patches it
    covers laid side by side (``[k*k*D]``): the pixel shuffle of Idefics3, InternVL and nanoVLM, the 2 x 2 merger of
    Qwen2-VL. Unlike average pooling it keeps where features lie inside a block -- what an object's shape is made
    of. A grid that s does not divide (8 x 8 patches to 3 x 3 tokens) is first resampled bilinearly to s*k x s*k,
    k = ceil(grid / s), so each token covers its own region of the image (on the toy world: one token per cell).
    """

    name = "merged"

    def __init__(self, num_tokens: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.shape = _pool_shape(num_tokens, "merged")
        self.grid = (int(grid[0]), int(grid[1]))
        self.block = tuple(-(-g // s) for g, s in zip(self.grid, self.shape))  # (kh, kw) patches per token

    def out_dim(self, in_dim: int) -> int:
        return in_dim * self.block[0] * self.block[1]

    def token_grid(self, grid: tuple[int, int] | None) -> tuple[int, int] | None:
        return None if grid is None else self.shape

    def forward(self, features: EncoderOutput) -> torch.Tensor:
        # patches [B, h*w, D] -> [B, s*s, kh*kw*D]
        if features.grid is None or tuple(features.grid) != self.grid:
            raise ValueError(f"token strategy 'merged' was built for the encoder's {self.grid[0]} x {self.grid[1]} "
                             f"patch grid but got {features.grid}; images must come at the encoder's image_size")
        b, n, d = features.patches.shape
        (h, w), (s, t), (kh, kw) = self.grid, self.shape, self.block
        x = features.patches.transpose(1, 2).reshape(b, d, h, w)
        if (h, w) != (s * kh, t * kw):
            x = F.interpolate(x, size=(s * kh, t * kw), mode="bilinear", align_corners=False)
        x = x.reshape(b, d, s, kh, t, kw).permute(0, 2, 4, 3, 5, 1)  # [B, s, t, kh, kw, D]
        return x.reshape(b, s * t, kh * kw * d)


def _no_count(name: str, num_tokens: int | None, fixed: str) -> None:
    if num_tokens is not None:
        raise ValueError(
            f"token strategy '{name}' gives {fixed} and takes no num_tokens (got {num_tokens}); "
            "use tokens.name=pooled to choose a token count"
        )


@register_token_strategy("cls")
def cls(num_tokens: int | None = None) -> TokenStrategy:
    """The CLS token (or the encoder's pooled feature): one image token."""
    if num_tokens not in (None, 1):
        _no_count("cls", num_tokens, "one token")
    return ClsTokens()


@register_token_strategy("patch")
def patch(num_tokens: int | None = None) -> TokenStrategy:
    """All patch tokens (LLaVA's default: CLS dropped)."""
    _no_count("patch", num_tokens, "all patches")
    return PatchTokens()


@register_token_strategy("cls_patch")
def cls_patch(num_tokens: int | None = None) -> TokenStrategy:
    """CLS followed by all patch tokens (HF Llava's ``full`` select strategy)."""
    _no_count("cls_patch", num_tokens, "1 + all patches")
    return ClsPatchTokens()


@register_token_strategy("pooled")
def pooled(num_tokens: int | None = None) -> TokenStrategy:
    """Patch grid average-pooled to ``num_tokens`` (a square number)."""
    if num_tokens is None:
        raise ValueError("token strategy 'pooled' needs tokens.num_tokens (a square: 1, 4, 9, 16, ...)")
    return PooledTokens(num_tokens)


@register_token_strategy("merged")
def merged(num_tokens: int | None = None, grid: tuple[int, int] | None = None) -> TokenStrategy:
    """Patch grid merged by concatenation (pixel shuffle) to ``num_tokens`` (a square number); ``grid`` is the
    encoder's patch grid, passed in by the model builder."""
    if num_tokens is None:
        raise ValueError("token strategy 'merged' needs tokens.num_tokens (a square: 1, 4, 9, 16, ...)")
    if grid is None:
        raise ValueError("token strategy 'merged' needs an encoder with a fixed 2-D patch grid (this one has none); "
                         "use tokens.name=pooled")
    return MergedTokens(num_tokens, grid)
