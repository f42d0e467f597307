"""Honeybee's C-Abstractor projector (Cha et al., "Honeybee: Locality-enhanced Projector for Multimodal LLM", 2024).

The C-Abstractor keeps the 2-D layout of the vision tokens: it reshapes them to a square grid, runs ResNet-style
convolution blocks, average-pools the grid down to ``num_tokens`` cells, runs more convolution blocks, and reads
every cell out with an MLP. Compared with a resampler (learned queries + cross-attention) each output token sees a
local window of the image, which is what "locality-preserving" means.

This re-implementation follows kakaobrain/honeybee (``CAbstractor``: RegStage(depth) -> AdaptiveAvgPool2d ->
RegStage(depth) -> MLP readout, SiLU activations, LayerNorm2d) but writes the bottleneck blocks out in plain torch
so the plugin only depends on torch and vlkit. Honeybee's optional learned positional embedding is left out because
the number of input tokens is not part of the projector factory's arguments.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

NAME = "c_abstractor"


def _square_side(n: int, what: str) -> int:
    side = math.isqrt(n) if n >= 0 else -1
    if n <= 0 or side * side != n:
        raise ValueError(f"projector '{NAME}': {what} must be a positive square number (4, 9, 16, ...), got {n}")
    return side


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of a [B, C, H, W] map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, H, W]
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    """Channel gating as in RegNetY (the block type Honeybee's RegStage uses)."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, H, W]
        s = x.mean(dim=(2, 3), keepdim=True)
        s = self.fc2(F.silu(self.fc1(s)))
        return x * torch.sigmoid(s)


class Bottleneck(nn.Module):
    """ResNet-style bottleneck: 1x1 -> 3x3 -> SE -> 1x1, plus a (projected) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, se_ratio: float = 0.25) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.norm1 = LayerNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = LayerNorm2d(out_ch)
        self.se = SqueezeExcite(out_ch, max(1, int(round(in_ch * se_ratio))))
        self.conv3 = nn.Conv2d(out_ch, out_ch, 1, bias=False)
        self.norm3 = LayerNorm2d(out_ch)
        self.shortcut: nn.Module = (
            nn.Identity() if in_ch == out_ch else nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), LayerNorm2d(out_ch))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, H, W] -> [B, C_out, H, W]
        y = F.silu(self.norm1(self.conv1(x)))
        y = F.silu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(self.se(y)))
        return F.silu(y + self.shortcut(x))


def _stage(depth: int, in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(*[Bottleneck(in_ch if i == 0 else out_ch, out_ch) for i in range(depth)])


class CAbstractor(nn.Module):
    """[B, N, in_dim] (N square) -> [B, num_tokens, out_dim]; ``num_tokens=None`` keeps N."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_tokens: int | None = None,
        depth: int = 2,
        hidden_dim: int | None = None,
        mlp_depth: int = 2,
    ) -> None:
        super().__init__()
        if num_tokens is not None:
            _square_side(num_tokens, "num_tokens")
        if depth < 0:
            raise ValueError(f"projector '{NAME}': depth must be >= 0, got {depth}")
        if mlp_depth < 1:
            raise ValueError(f"projector '{NAME}': mlp_depth must be >= 1, got {mlp_depth}")
        hidden_dim = hidden_dim or in_dim
        self.in_dim, self.out_dim, self.num_tokens, self.hidden_dim = in_dim, out_dim, num_tokens, hidden_dim
        self.s1 = _stage(depth, in_dim, hidden_dim) if depth > 0 else _channel_map(in_dim, hidden_dim)
        self.s2 = _stage(depth, hidden_dim, hidden_dim)
        layers: list[nn.Module] = [nn.Linear(hidden_dim, out_dim)]
        for _ in range(mlp_depth - 1):
            layers += [nn.SiLU(), nn.Linear(out_dim, out_dim)]
        self.readout = nn.Sequential(*layers)

    def token_grid(self, grid: tuple[int, int] | None) -> tuple[int, int] | None:
        """The m x m layout of the pooled output tokens (optional part of vlkit's contract: fusion.cells names them);
        None when the input tokens have no layout or a non-square one (``forward`` refuses those)."""
        if grid is None or grid[0] != grid[1]:
            return None
        side = grid[0] if self.num_tokens is None else math.isqrt(self.num_tokens)
        return side, side

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, D_in] -> [B, M, D_out]
        if x.dim() != 3 or x.shape[-1] != self.in_dim:
            raise ValueError(f"projector '{NAME}': expected [B, N, {self.in_dim}], got {tuple(x.shape)}")
        b, n, d = x.shape
        side = _square_side(n, f"the number of input tokens N (input shape {tuple(x.shape)})")
        out_side = side if self.num_tokens is None else math.isqrt(self.num_tokens)
        x = x.transpose(1, 2).reshape(b, d, side, side)  # [B, D_in, h, w], row-major tokens
        x = self.s1(x)  # [B, D_hid, h, w]
        x = F.adaptive_avg_pool2d(x, (out_side, out_side))  # [B, D_hid, m, m]
        x = self.s2(x)  # [B, D_hid, m, m]
        x = x.flatten(2).transpose(1, 2)  # [B, M, D_hid]
        return self.readout(x)  # [B, M, D_out]


def _channel_map(in_ch: int, out_ch: int) -> nn.Module:
    return nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)


def c_abstractor(
    in_dim: int,
    out_dim: int,
    num_tokens: int | None = None,
    depth: int = 2,
    hidden_dim: int | None = None,
    mlp_depth: int = 2,
) -> CAbstractor:
    """vlkit projector factory ``c_abstractor``.

    Args:
        in_dim: feature dim of the tokens coming in (from vlkit).
        out_dim: the LLM's hidden size (from vlkit).
        num_tokens: output tokens per image; must be a square number. ``None`` keeps the input count.
        depth: bottleneck blocks before and after pooling (default 2; 0 skips the convolutions).
        hidden_dim: channels of the convolution stages; defaults to ``in_dim``.
        mlp_depth: Linear layers in the readout MLP (SiLU between them).
    """
    return CAbstractor(in_dim, out_dim, num_tokens=num_tokens, depth=depth, hidden_dim=hidden_dim, mlp_depth=mlp_depth)
