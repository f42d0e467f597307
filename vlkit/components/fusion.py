"""Fusion: how image embeddings enter the LLM.

- ``prefix`` (LLaVA): the M image embeddings replace the ``<image>`` placeholder in the input sequence. With
  ``cells`` (names of a g x g grid of image regions, row-major) each region's image tokens follow its name, as
  Idefics3 writes ``<row_r_col_c>`` before each tile: ``northwest:<img><img>, north:<img>, ...``. The LLM can
  then find a region by its name, the look-up an LM learns from text, instead of counting image tokens.
- ``xattn`` (Flamingo): gated cross-attention blocks run before every ``every``-th decoder layer; text hidden
  states attend to the image embeddings; the tanh gates start at 0 so the frozen LLM starts unchanged. The image
  takes no positions in the sequence.

Factory contract: ``factory(llm=<HFCausalLM>, **params) -> nn.Module`` with attribute ``in_sequence: bool``; a
module with ``in_sequence = False`` also has ``set_context(image_embeds [B, M, D] | None, has_image [B] bool)``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from vlkit.registry import register_fusion


class PrefixFusion(nn.Module):
    """LLaVA's splice; optionally a name before each grid cell's image tokens (``cells``)."""

    in_sequence = True

    def __init__(self, cells: Sequence[str] | None = None, cell_format: str = "{name}:",
                 separator: str = ", ") -> None:
        super().__init__()
        self.cell_format, self.separator = cell_format, separator
        self.cells = None if cells is None else _check_cells(cells, cell_format, separator)
        self.grid = math.isqrt(len(self.cells)) if self.cells else 0

    def cell_groups(self, grid: tuple[int, int] | None) -> list[list[int]] | None:
        """Which image tokens each cell gets, given the tokens' row-major (h, w) layout (``VLM.image_grid``): each
        token goes to the cell holding its centre, each cell's tokens row-major (8 x 8 tokens over 3 x 3 cells give
        3, 2, 3 rows and columns). None when there are no cells, or when the tokens have no layout (CLS, learned
        queries, a CLS expanded to k tokens) or one coarser than the cells (1 or 4 pooled tokens): no token then
        lies in one cell, and the tokens go in unnamed, in their own order."""
        if self.cells is None or grid is None:
            return None
        h, w = grid
        if h < self.grid or w < self.grid:
            return None
        groups: list[list[int]] = [[] for _ in self.cells]
        for r in range(h):
            for c in range(w):
                cell = ((2 * r + 1) * self.grid // (2 * h)) * self.grid + (2 * c + 1) * self.grid // (2 * w)
                groups[cell].append(r * w + c)
        return groups

    def order(self, grid: tuple[int, int] | None) -> list[int] | None:
        """The image tokens in the order they enter the sequence (cell by cell), or None to keep theirs."""
        groups = self.cell_groups(grid)
        return None if groups is None else [i for g in groups for i in g]

    def span(self, tokenizer, image_token_id: int, num_tokens: int,
             grid: tuple[int, int] | None = None) -> list[int]:
        """The ids one ``<image>`` placeholder becomes: M image-token ids, with each cell's name before its own."""
        groups = self.cell_groups(grid)
        if groups is None:
            return [image_token_id] * num_tokens
        if sum(len(g) for g in groups) != num_tokens:
            raise ValueError(f"fusion 'prefix': a {grid[0]} x {grid[1]} token grid does not hold {num_tokens} tokens")
        out: list[int] = []
        for i, (name, group) in enumerate(zip(self.cells, groups)):
            text = (self.separator if i else "") + self.cell_format.format(name=name)
            out += tokenizer(text, add_special_tokens=False)["input_ids"] + [image_token_id] * len(group)
        if out.count(image_token_id) != num_tokens:
            raise ValueError(f"fusion.cells: a cell name in {self.cells} tokenizes to the image token")
        return out


def _check_cells(cells: object, cell_format: object, separator: object) -> list[str]:
    """``fusion.cells`` as a list of g*g distinct names; ValueError naming the key otherwise."""
    if isinstance(cells, str) or not isinstance(cells, Sequence):
        raise ValueError(f"fusion.cells: must be a list of g*g cell names, row-major (a YAML list, e.g. 9 names "
                         f"for 3 x 3); got {cells!r}")
    cells = list(cells)
    if not cells:
        raise ValueError("fusion.cells: an empty list; leave the key out (or set it to null) for no cell names")
    grid = math.isqrt(len(cells))
    if grid * grid != len(cells) or not all(isinstance(c, str) and c.strip() for c in cells):
        raise ValueError(f"fusion.cells: must be g*g non-empty names of a g x g grid, row-major (e.g. 9 for 3 x 3); "
                         f"got {len(cells)}: {cells}")
    if len(set(cells)) != len(cells):
        dup = sorted({c for c in cells if cells.count(c) > 1})
        raise ValueError(f"fusion.cells: names must be distinct; {dup} repeat")
    if not isinstance(cell_format, str) or "{name}" not in cell_format:
        raise ValueError(f"fusion.cell_format: must be a string containing '{{name}}'; got {cell_format!r}")
    if not isinstance(separator, str):
        raise ValueError(f"fusion.separator: must be a string; got {separator!r}")
    return cells


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's GATED XATTN-DENSE: x + tanh(a) * attn(x, img); x + tanh(b) * ffn(x)."""

    def __init__(self, dim: int, num_heads: int, ff_mult: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, int(dim * ff_mult)), nn.GELU(), nn.Linear(int(dim * ff_mult), dim))
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ffn_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, image: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
        # x [B, T, D], image [B, M, D], has_image [B] -> [B, T, D]
        keep = has_image.to(x.dtype).view(-1, 1, 1)
        attn = self.attn(self.attn_norm(x), image.to(x.dtype), image.to(x.dtype), need_weights=False)[0]
        x = x + keep * torch.tanh(self.attn_gate) * attn
        return x + keep * torch.tanh(self.ffn_gate) * self.ffn(self.ffn_norm(x))


class CrossAttentionFusion(nn.Module):
    in_sequence = False

    def __init__(self, llm: nn.Module, every: int = 1, num_heads: int = 4, ff_mult: float = 2.0) -> None:
        super().__init__()
        if every < 1:
            raise ValueError(f"fusion 'xattn': every must be >= 1, got {every}")
        layers = llm.base().get_decoder().layers
        dim = llm.hidden_size
        if dim % num_heads:
            raise ValueError(f"fusion 'xattn': LLM hidden size {dim} is not divisible by num_heads {num_heads}")
        self.positions = list(range(0, len(layers), every))
        self.blocks = nn.ModuleList(GatedCrossAttentionBlock(dim, num_heads, ff_mult) for _ in self.positions)
        self._image: torch.Tensor | None = None
        self._has_image: torch.Tensor | None = None
        # forward pre-hooks leave the LLM's own module tree (names, LoRA targets, state dict) untouched
        for block, pos in zip(self.blocks, self.positions):
            layers[pos].register_forward_pre_hook(self._hook(block), with_kwargs=True)

    def set_context(self, image: torch.Tensor | None, has_image: torch.Tensor | None) -> None:
        self._image, self._has_image = image, has_image

    def _hook(self, block: GatedCrossAttentionBlock):
        def pre_hook(module, args, kwargs):
            if self._image is None:
                return None
            if args:
                return (block(args[0], self._image, self._has_image), *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = block(kwargs["hidden_states"], self._image, self._has_image)
            return args, kwargs

        return pre_hook


@register_fusion("prefix")
def prefix(cells: list[str] | None = None, cell_format: str = "{name}:", separator: str = ", ") -> nn.Module:
    """LLaVA: image embeddings take the placeholder's place in the sequence; with ``cells`` (g*g names, row-major)
    each grid cell's tokens follow ``cell_format`` of its name, cells joined by ``separator``."""
    return PrefixFusion(cells, cell_format, separator)


@register_fusion("xattn")
def xattn(llm: nn.Module, every: int = 1, num_heads: int = 4, ff_mult: float = 2.0) -> nn.Module:
    """Flamingo-style gated cross-attention before every ``every``-th LLM layer (gates start at 0)."""
    return CrossAttentionFusion(llm, every=every, num_heads=num_heads, ff_mult=ff_mult)
