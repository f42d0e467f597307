"""Small data types of the public plugin contract (no heavy logic here)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EncoderOutput:
    """What every vision encoder returns.

    cls:     [B, D] global feature (CLS token or the encoder's pooled feature), or None if it has none.
    patches: [B, N, D] spatial tokens in row-major order of ``grid``.
    grid:    (h, w) with h * w == N, or None when the tokens have no 2-D layout.
    """

    patches: torch.Tensor
    cls: torch.Tensor | None = None
    grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.patches.dim() != 3:
            raise ValueError(f"EncoderOutput.patches must be [B, N, D], got shape {tuple(self.patches.shape)}")
        if self.grid is not None and self.grid[0] * self.grid[1] != self.patches.shape[1]:
            raise ValueError(f"EncoderOutput.grid {self.grid} does not match {self.patches.shape[1]} patches")
        if self.cls is not None and self.cls.dim() != 2:
            raise ValueError(f"EncoderOutput.cls must be [B, D], got shape {tuple(self.cls.shape)}")
