"""Fusion: how image embeddings enter the LLM.

- ``prefix`` (LLaVA): the M image embeddings replace the ``<image>`` placeholder in the input sequence.
- ``xattn`` (Flamingo): gated cross-attention blocks run before every ``every``-th decoder layer; text hidden
  states attend to the image embeddings; the tanh gates start at 0 so the frozen LLM starts unchanged. The image
  takes no positions in the sequence.

Factory contract: ``factory(llm=<HFCausalLM>, **params) -> nn.Module`` with attribute ``in_sequence: bool``; a
module with ``in_sequence = False`` also has ``set_context(image_embeds [B, M, D] | None, has_image [B] bool)``.
"""
from __future__ import annotations

import torch
from torch import nn

from vlkit.registry import register_fusion


class PrefixFusion(nn.Module):
    in_sequence = True


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
def prefix() -> nn.Module:
    """LLaVA: image embeddings take the placeholder's place in the sequence."""
    return PrefixFusion()


@register_fusion("xattn")
def xattn(llm: nn.Module, every: int = 1, num_heads: int = 4, ff_mult: float = 2.0) -> nn.Module:
    """Flamingo-style gated cross-attention before every ``every``-th LLM layer (gates start at 0)."""
    return CrossAttentionFusion(llm, every=every, num_heads=num_heads, ff_mult=ff_mult)
