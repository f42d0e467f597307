"""Hugging Face encoders (``hf_clip``, ``hf_siglip``): a transformers vision tower kept whole for export.
transformers is imported inside the factories only."""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from vlkit.components.encoders.base import HALF, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, WrappedEncoder, _square
from vlkit.registry import register_encoder
from vlkit.types import EncoderOutput

logger = logging.getLogger(__package__)  # "vlkit.components.encoders", as before the split

_OTHER_TOWER_KEYS = ("text_model.", "text_projection", "visual_projection", "logit_scale", "logit_bias")


class _HoldBack(logging.Filter):
    """Holds back transformers' LOAD REPORT so the expected text-tower keys of a full CLIP/SigLIP checkpoint do
    not print a table of hundreds of 'UNEXPECTED' rows; anything else is re-emitted."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.held.append(record)
            return False
        return True


def _hf_load(model_cls: Any, model: str, trust_remote_code: bool) -> nn.Module:
    """``model_cls.from_pretrained`` (hub id or local dir; a full CLIPModel/SiglipModel dir yields its vision
    tower); missing weights (silently random-initialised by transformers) are an error here."""
    hf_logger = logging.getLogger("transformers.modeling_utils")
    hold = _HoldBack()
    hf_logger.addFilter(hold)
    try:
        net, info = model_cls.from_pretrained(model, trust_remote_code=trust_remote_code, output_loading_info=True)
    finally:
        hf_logger.removeFilter(hold)
    missing = list(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    unexpected = [k for k in (info.get("unexpected_keys") or []) if not k.startswith(_OTHER_TOWER_KEYS)]
    if unexpected or missing or mismatched:
        for record in hold.held:
            hf_logger.handle(record)
    if missing or mismatched:
        raise ValueError(
            f"{model_cls.__name__}.from_pretrained({model!r}) left weights uninitialised "
            f"(missing: {missing[:5]}{'...' if len(missing) > 5 else ''}, mismatched: {mismatched[:5]})"
        )
    return net


def _hf_image_processor(processor_cls: Any, model: str, trust_remote_code: bool) -> Any | None:
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "preprocessor_config.json")):
        return None
    try:
        return processor_cls.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("no image processor config for %s (%s); using %s defaults", model, exc, processor_cls.__name__)
        return None


class HFVisionEncoder(WrappedEncoder):
    """A Hugging Face ViT-style vision tower (``CLIPVisionModel``, ``SiglipVisionModel``) kept as ``hf_model``
    for export. Runs it with ``output_hidden_states=True`` and returns ``hidden_states[...]`` for ``layer``
    untouched (see the package docstring). With ``cls_token`` (CLIP) token 0 is ``cls`` and tokens 1: are the
    patches; without (SigLIP) all tokens are patches and ``cls`` is ``pooler_output`` (the attention-pooling
    head) at the last layer, else the mean of the patches."""

    _blocks_path = "hf_model.encoder.layers"

    def __init__(
        self, hf_model: nn.Module, model_name: str, kind: str, layer: int = -1, frozen: bool = True,
        cls_token: bool = True, image_processor: Any | None = None,
        default_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
        default_std: tuple[float, float, float] = OPENAI_CLIP_STD,
    ) -> None:
        super().__init__(model_name=model_name, layer=layer, frozen=frozen)
        self.kind = kind
        self.hf_model = hf_model
        self.image_processor = image_processor
        cfg = hf_model.config
        self._select_layer(int(cfg.num_hidden_layers))
        # hidden_states has depth + 1 entries (0 = embeddings): block i is hidden_states[i + 1]
        self._hs_index = layer if layer < 0 else layer + 1
        self.embed_dim = int(cfg.hidden_size)
        self.image_size = _square(cfg.image_size, model_name)
        side = self.image_size // _square(cfg.patch_size, model_name)
        self.grid = (side, side)
        self.has_cls = bool(cls_token)
        self._set_normalisation(getattr(image_processor, "image_mean", None) or default_mean,
                                getattr(image_processor, "image_std", None) or default_std)
        self._finish_init()

    def _unused(self) -> list[Any]:
        m = self.hf_model
        out: list[Any] = self._later_blocks()
        if self.has_cls or not self._is_last:  # CLIP: tokens are never post-normed; SigLIP: pooler only at -1
            out += [getattr(m, "post_layernorm", None), getattr(m, "head", None)]
        return out

    def _encode(self, pixel_values: torch.Tensor) -> EncoderOutput:
        # [B, 3, H, W] -> EncoderOutput(patches [B, N, D], cls [B, D], grid (h, w)); hidden states untouched
        out = self.hf_model(pixel_values=pixel_values, output_hidden_states=True)
        hs = out.hidden_states[self._hs_index]  # [B, T, D]
        if self.has_cls:
            return self._output(hs[:, 1:], hs[:, 0], pixel_values)
        pooled = getattr(out, "pooler_output", None) if self._is_last else None
        return self._output(hs, pooled if pooled is not None and pooled.dim() == 2 else None, pixel_values)


def _hf_tower(kind: str, model_cls: Any, processor_cls: Any, model: str, layer: int, frozen: bool,
              trust_remote_code: bool, cls_token: bool, default_mean: tuple[float, float, float],
              default_std: tuple[float, float, float], random_init: bool = False) -> HFVisionEncoder:
    """``model_cls.from_pretrained(model)`` with its image processor (when the dir has one), wrapped. With
    ``random_init`` the tower is built from ``model``'s published config with random weights (no weights read; the
    encoder is marked, see vlkit/random_init.py) and mean/std are the defaults unless a local dir has a processor."""
    if random_init:
        from vlkit.random_init import fixed_seed, mark_random, published_config

        with fixed_seed():
            net = model_cls._from_config(published_config(model, sub="vision_config"))
        proc = _hf_image_processor(processor_cls, model, trust_remote_code) if os.path.isdir(model) else None
    else:
        net = _hf_load(model_cls, model, trust_remote_code)
        proc = _hf_image_processor(processor_cls, model, trust_remote_code)
    encoder = HFVisionEncoder(
        net, model_name=model, kind=kind, layer=layer, frozen=frozen, cls_token=cls_token, image_processor=proc,
        default_mean=default_mean, default_std=default_std,
    )
    return mark_random(encoder) if random_init else encoder


@register_encoder("hf_clip")
def hf_clip(
    model: str = "openai/clip-vit-large-patch14-336",
    layer: int = -1,
    frozen: bool = True,
    trust_remote_code: bool = False,
    random_init: bool = False,
) -> HFVisionEncoder:
    """``CLIPVisionModel.from_pretrained(model)``: a hub id or a local dir holding a ``CLIPVisionModel`` or a full
    ``CLIPModel`` (its vision tower is taken). LLaVA-1.5 uses ``layer=-2``. mean/std from the dir's
    ``CLIPImageProcessor`` when present, else the OpenAI CLIP constants. The tower is ``.hf_model``.
    ``random_init=True``: random weights at the published config's shapes, only when asked (vlkit/random_init.py)."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    return _hf_tower("hf_clip", CLIPVisionModel, CLIPImageProcessor, model, layer, frozen, trust_remote_code,
                     cls_token=True, default_mean=OPENAI_CLIP_MEAN, default_std=OPENAI_CLIP_STD, random_init=random_init)


@register_encoder("hf_siglip")
def hf_siglip(
    model: str = "google/siglip-so400m-patch14-384",
    layer: int = -1,
    frozen: bool = True,
    trust_remote_code: bool = False,
    random_init: bool = False,
) -> HFVisionEncoder:
    """``SiglipVisionModel.from_pretrained(model)`` (hub id, local ``SiglipVisionModel`` or full ``SiglipModel``
    dir). No CLS token: ``patches`` are all tokens, ``has_cls`` is False, ``cls`` is the attention-pooled
    ``pooler_output`` at ``layer=-1`` (mean of patches otherwise). mean/std from the ``SiglipImageProcessor``
    when present, else 0.5/0.5. ``random_init=True``: random weights from the published config (vlkit/random_init.py)."""
    from transformers import SiglipImageProcessor, SiglipVisionModel

    return _hf_tower("hf_siglip", SiglipVisionModel, SiglipImageProcessor, model, layer, frozen, trust_remote_code,
                     cls_token=False, default_mean=HALF, default_std=HALF, random_init=random_init)
