"""Pixel-shuffle (space-to-depth) token reduction, as in nanoVLM and Idefics3.

Each ``s x s`` block of neighbouring patches is folded into one token by concatenating their features, so the
token count drops by ``s**2`` and the feature dim grows by ``s**2``: ``[B, h*w, D] -> [B, (h/s)*(w/s), D*s*s]``.
No parameters are learned; the projector after it sees the wider features (vlkit sizes it through ``out_dim``).
The encoder's CLS token, if any, is dropped.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

NAME = "pixel_shuffle"


class PixelShuffle(nn.Module):
    """Token strategy module: ``strategy(features) -> [B, N', D']``."""

    def __init__(self, num_tokens: int | None = None, scale_factor: int | None = None) -> None:
        super().__init__()
        if num_tokens is not None and num_tokens <= 0:
            raise ValueError(f"token strategy '{NAME}': num_tokens must be positive, got {num_tokens}")
        if scale_factor is not None and (not isinstance(scale_factor, int) or scale_factor < 1):
            raise ValueError(f"token strategy '{NAME}': scale_factor must be a positive int, got {scale_factor!r}")
        if scale_factor is None and num_tokens is None:
            scale_factor = 2
        self.num_tokens = num_tokens
        self.scale_factor = scale_factor  # None: derived from num_tokens and the grid on each call

    def out_dim(self, in_dim: int) -> int:
        """Feature dim after the shuffle (optional part of vlkit's token-strategy contract)."""
        if self.scale_factor is None:
            raise ValueError(
                f"token strategy '{NAME}': with only num_tokens={self.num_tokens} the scale factor, and so the output "
                "dim, depends on the encoder's grid; also set scale_factor (e.g. scale_factor=2 for a 4x reduction)"
            )
        return in_dim * self.scale_factor**2

    def token_grid(self, grid: tuple[int, int] | None) -> tuple[int, int] | None:
        """The (h/s, w/s) layout of the shuffled tokens (optional part of vlkit's contract: fusion.cells names them)."""
        if grid is None:
            return None
        s = self._scale_for(*grid)
        return grid[0] // s, grid[1] // s

    def _scale_for(self, h: int, w: int) -> int:
        if self.scale_factor is not None:
            s = self.scale_factor
        else:
            ratio = (h * w) / self.num_tokens  # type: ignore[operator]
            s = math.isqrt(round(ratio))
            if s < 1 or s * s * self.num_tokens != h * w:  # type: ignore[operator]
                raise ValueError(
                    f"token strategy '{NAME}': cannot reach num_tokens={self.num_tokens} from a {h}x{w} grid "
                    f"({h * w} patches); h*w/num_tokens must be a square number"
                )
        if h % s or w % s:
            raise ValueError(f"token strategy '{NAME}': grid {h}x{w} is not divisible by scale_factor {s}")
        if self.num_tokens is not None and (h // s) * (w // s) != self.num_tokens:
            raise ValueError(
                f"token strategy '{NAME}': scale_factor {s} on a {h}x{w} grid gives {(h // s) * (w // s)} tokens, "
                f"but num_tokens={self.num_tokens}"
            )
        return s

    def forward(self, features: Any) -> torch.Tensor:  # patches [B, h*w, D] -> [B, (h/s)*(w/s), D*s*s]
        x, grid = features.patches, features.grid
        if grid is None:
            raise ValueError(
                f"token strategy '{NAME}' needs a 2-D patch grid, but the encoder gave grid=None "
                f"(patches {tuple(x.shape)}); use an encoder with a spatial grid"
            )
        h, w = grid
        b, n, d = x.shape
        if h * w != n:
            raise ValueError(f"token strategy '{NAME}': grid {h}x{w} does not match {n} patches")
        s = self._scale_for(h, w)
        x = x.reshape(b, h // s, s, w // s, s, d)  # [B, h/s, s, w/s, s, D]
        x = x.permute(0, 1, 3, 2, 4, 5)  # [B, h/s, w/s, s, s, D]
        return x.reshape(b, (h // s) * (w // s), s * s * d)  # [B, N', D*s*s]

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, scale_factor={self.scale_factor}"


def pixel_shuffle(num_tokens: int | None = None, scale_factor: int | None = None) -> PixelShuffle:
    """vlkit token-strategy factory ``pixel_shuffle``.

    Args:
        num_tokens: tokens per image wanted; when given without ``scale_factor`` the factor is derived from the grid
            as ``sqrt(h*w / num_tokens)``. When both are given they must agree.
        scale_factor: side of the folded block; default 2 when ``num_tokens`` is not given either.
    """
    return PixelShuffle(num_tokens=num_tokens, scale_factor=scale_factor)
