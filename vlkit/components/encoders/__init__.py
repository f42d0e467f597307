"""Vision encoders: a small common interface over timm, open_clip and Hugging Face vision towers.

Every encoder is a :class:`VisionEncoder` (an ``nn.Module``) whose ``forward(pixel_values)`` returns an
:class:`~vlkit.types.EncoderOutput` and which exposes the same attributes (``embed_dim``, ``image_size``,
``mean``/``std``, ``has_cls``, ``grid``, ``num_patches``, ``layer``, ``identity()``, ``blocks()``).

Conventions shared by all built-in encoders
-------------------------------------------
``layer``
    Index of the transformer block (ConvNeXt: stage) whose output is taken, Python-style over ``blocks()`` of the
    full model: ``-1`` is the last block, ``-2`` the penultimate one (LLaVA's ``mm_vision_select_layer=-2``), ``0``
    the first block. For Hugging Face models negative values index ``hidden_states`` exactly as LLaVA's
    ``vision_feature_layer`` does (``hidden_states[0]`` is the embedding output, so ``hidden_states[-2]`` is the
    penultimate block); a non-negative ``k`` means block ``k``, i.e. ``hidden_states[k + 1]``.
Final norm
    timm and open_clip ViTs apply their final norm (timm ``norm``, open_clip ``ln_post``; ConvNeXt ``norm_pre``)
    to the tokens only when the last block is selected: intermediate blocks are returned raw, as LLaVA does, and
    the last block's output then equals the library's own ``forward_features``. Hugging Face encoders return
    ``hidden_states[layer]`` untouched at every layer (``post_layernorm`` is never applied to the tokens) so
    that features match ``LlavaForConditionalGeneration`` bit for bit when the tower is exported.
``has_cls`` / ``cls``
    ``has_cls`` is True only when the model has a real CLS token that went through the transformer with the
    patches (CLIP-style ViTs); ``cls`` is then that token at the chosen layer. Otherwise ``cls`` still holds a
    global feature but ``has_cls`` is False: the model's own pooled feature at the last layer (timm ``map``/``avg``
    head, ConvNeXt's pooled+normed head input, SigLIP's attention-pooling head), else the mean of the patches.
    So ``cls`` is never None for the built-in encoders.
Frozen
    ``frozen=True`` (default) sets ``requires_grad=False`` on every parameter and keeps the module in eval mode
    even when a parent calls ``.train()``. ``frozen=False`` makes trainable exactly the parameters that reach the
    output at this ``layer`` (blocks after it, unused norms/heads/projections stay frozen: no DDP
    ``find_unused_parameters`` needed). ``unfreeze()`` / ``freeze()`` switch later; for partial unfreezing set
    ``requires_grad`` on ``blocks()[-k:]`` and call ``unfreeze(params=False)`` so train mode follows.

Heavy libraries (timm, open_clip, transformers) are imported inside the factories only.

Modules: ``base`` (the interface, the wrapper base :class:`WrappedEncoder` with the shared layer selection,
normalisation and output logic, helpers), then one thin module per library: ``timm_encoders``,
``open_clip_encoder``, ``hf_encoders``. Importing this package registers every built-in encoder.
"""
from __future__ import annotations

from vlkit.components.encoders.base import (
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    VisionEncoder,
    WrappedEncoder,
    resolve_layer,
)
from vlkit.components.encoders.timm_encoders import TimmConvNeXtEncoder, TimmViTEncoder, timm_convnext, timm_vit
from vlkit.components.encoders.open_clip_encoder import OpenCLIPEncoder, open_clip  # noqa: I001 - registration order
from vlkit.components.encoders.hf_encoders import HFVisionEncoder, hf_clip, hf_siglip

__all__ = [
    "HALF", "IMAGENET_MEAN", "IMAGENET_STD", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "VisionEncoder", "WrappedEncoder",
    "resolve_layer", "TimmViTEncoder", "TimmConvNeXtEncoder", "timm_vit", "timm_convnext", "OpenCLIPEncoder",
    "open_clip", "HFVisionEncoder", "hf_clip", "hf_siglip",
]
