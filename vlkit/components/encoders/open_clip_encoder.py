"""The open_clip encoder (``open_clip``): the visual tower of an open_clip model. open_clip is imported inside the
factory and the class's constructor only."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlkit.components.encoders.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, WrappedEncoder, _square
from vlkit.registry import register_encoder
from vlkit.types import EncoderOutput


class OpenCLIPEncoder(WrappedEncoder):
    """The visual tower of an open_clip model (native ``open_clip.transformer.VisionTransformer`` only; towers
    built from timm models or ModifiedResNet are rejected: use ``timm_vit`` / ``timm_convnext`` for those).

    Runs ``_embeds`` (patchify + class/pos embedding + ``ln_pre``) and the first ``layer`` resblocks. At the last
    layer ``ln_post`` is applied to every token (as open_clip does before pooling); ``proj`` is never applied,
    so ``cls`` and ``patches`` share ``embed_dim`` (the transformer width). ``has_cls`` is True for
    ``pool_type='tok'`` towers without attentional pooling; otherwise ``cls`` is the mean of the patches.
    """

    kind = "open_clip"
    _blocks_path = "visual.transformer.resblocks"

    def __init__(self, visual: nn.Module, model_name: str = "open_clip", layer: int = -1, frozen: bool = True) -> None:
        super().__init__(model_name=model_name, layer=layer, frozen=frozen)
        from open_clip.transformer import VisionTransformer

        if not isinstance(visual, VisionTransformer):
            raise NotImplementedError(
                f"open_clip model {model_name!r} has a {type(visual).__name__} vision tower; only open_clip's own "
                "VisionTransformer is supported (use timm_vit / timm_convnext for timm-based towers)"
            )
        self.visual = visual
        self._select_layer(len(visual.transformer.resblocks))
        self.embed_dim = int(visual.transformer.width)
        self.image_size = _square(visual.image_size, model_name)
        self.grid = tuple(int(g) for g in visual.grid_size)  # type: ignore[assignment]
        self.has_cls = getattr(visual, "pool_type", "tok") == "tok" and getattr(visual, "attn_pool", None) is None
        pp = dict(getattr(visual, "preprocess_cfg", None) or {})
        self._set_normalisation(pp.get("mean", getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN),
                                pp.get("std", getattr(visual, "image_std", None) or OPENAI_CLIP_STD))
        self.preprocess_cfg = pp
        self._finish_init()

    def _unused(self) -> list[Any]:
        v = self.visual
        out: list[Any] = self._later_blocks()
        out += [getattr(v, "proj", None), getattr(v, "attn_pool", None), getattr(v, "attn_pool_contrastive", None)]
        if not self._is_last or getattr(v, "attn_pool", None) is not None:
            out.append(v.ln_post)
        return out

    def _encode(self, pixel_values: torch.Tensor) -> EncoderOutput:
        # [B, 3, H, W] -> EncoderOutput(patches [B, N, W], cls [B, W], grid (h, w)); W = transformer width
        x = self.visual._embeds(pixel_values)  # [B, 1 + N, W] (class token first), after ln_pre
        _, inter = self.visual.transformer.forward_intermediates(x, indices=[self._index], stop_early=True)
        tokens = inter[0]  # [B, 1 + N, W], batch-first whatever the tower's layout
        if self._is_last and getattr(self.visual, "attn_pool", None) is None:
            tokens = self.visual.ln_post(tokens)
        patches = tokens[:, 1:]
        return self._output(patches, tokens[:, 0] if self.has_cls else None, pixel_values)


@register_encoder("open_clip")
def open_clip(
    model: str = "ViT-B-32",
    pretrained: str | None = None,
    layer: int = -1,
    image_size: int | None = None,
    frozen: bool = True,
) -> OpenCLIPEncoder:
    """``open_clip.create_model(model, pretrained=...)``: ``pretrained`` is a tag (``'openai'``,
    ``'laion2b_s34b_b79k'``) or a local checkpoint file (.pt/.bin/.safetensors); ``model`` may also be
    ``'local-dir:/path'`` (open_clip_config.json + weights) or ``'hf-hub:org/repo'``. ``image_size`` is open_clip's
    ``force_image_size`` (pos-embeds are resized on load). Only the visual tower is kept. mean/std come from
    ``visual.preprocess_cfg`` (for a bare local file these are open_clip's defaults, the OpenAI CLIP constants,
    since no tag config is known: pass ``local-dir:`` with a preprocess_cfg to override)."""
    import open_clip as oc

    kwargs: dict[str, Any] = {}
    if image_size is not None:
        kwargs["force_image_size"] = int(image_size)
    if pretrained and not isinstance(pretrained, str):
        raise TypeError(f"open_clip: pretrained must be a tag or a file path, got {pretrained!r}")
    full = oc.create_model(model, pretrained=pretrained or None, **kwargs)
    visual = full.visual
    del full
    return OpenCLIPEncoder(visual, model_name=model, layer=layer, frozen=frozen)
