"""timm encoders: ViTs (``timm_vit``) and ConvNeXts (``timm_convnext``). timm is imported inside the factories only."""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from vlkit.components.encoders.base import IMAGENET_MEAN, IMAGENET_STD, WrappedEncoder, _square, _triple
from vlkit.registry import register_encoder
from vlkit.types import EncoderOutput


def _timm_create(model: str, pretrained: bool, checkpoint_path: str | None, **kwargs: Any) -> nn.Module:
    """timm.create_model; a local ``checkpoint_path`` goes through timm's own pretrained loader (file override),
    so its checkpoint filter (format conversion, pos-embed resize, classifier removal) and safetensors support
    apply. Missing keys (which timm only logs) are turned into an error."""
    import timm

    if not checkpoint_path:
        return timm.create_model(model, pretrained=pretrained, **kwargs)
    path = os.fspath(checkpoint_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint_path {path!r} does not exist")

    records: list[logging.LogRecord] = []

    class _Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    builder_logger = logging.getLogger("timm.models._builder")
    handler, old_level = _Catch(level=logging.INFO), builder_logger.level
    builder_logger.addHandler(handler)
    if builder_logger.getEffectiveLevel() > logging.INFO:
        builder_logger.setLevel(logging.INFO)
    try:
        net = timm.create_model(model, pretrained=True, pretrained_cfg_overlay={"file": path}, **kwargs)
    finally:
        builder_logger.removeHandler(handler)
        builder_logger.setLevel(old_level)
    missing = [r.getMessage() for r in records if r.getMessage().startswith("Missing keys")]
    if missing:
        raise ValueError(f"checkpoint {path!r} does not fit timm model '{model}': {missing[0]}")
    return net


def _timm_mean_std(net: nn.Module) -> tuple[tuple[float, float, float], tuple[float, float, float], dict]:
    import timm.data

    cfg = timm.data.resolve_model_data_config(net)
    return _triple(cfg.get("mean", IMAGENET_MEAN), "mean"), _triple(cfg.get("std", IMAGENET_STD), "std"), cfg


class _TimmEncoder(WrappedEncoder):
    """What the timm wrappers share: the model check, the data config (mean/std) and the pooled head feature."""

    model: nn.Module

    def _wrap(self, model: nn.Module, required: tuple[str, ...], what: str, advice: str = "") -> None:
        """Keep ``model`` after checking that it has every ``required`` attribute (TypeError when one is missing:
        the model is not ``what``, e.g. "a ViT"; ``advice`` ends the message)."""
        for attr in required:
            if not hasattr(model, attr):
                raise TypeError(f"timm model {self.model_name!r} is not {what} (no '{attr}'){advice}")
        self.model = model

    def _use_data_config(self) -> None:
        self.mean, self.std, self.data_config = _timm_mean_std(self.model)

    def _pooled(self, x: torch.Tensor, width: int) -> torch.Tensor | None:
        # x: the head's input ([B, P + N, D] tokens or a [B, C, h, w] map) -> [B, width] pre-logits feature, or None
        if not hasattr(self.model, "forward_head"):
            return None
        pooled = self.model.forward_head(x, pre_logits=True)
        return pooled if pooled.dim() == 2 and pooled.shape[-1] == width else None


class TimmViTEncoder(_TimmEncoder):
    """A timm ViT (``VisionTransformer``, ``Eva``, relpos and hybrid variants: anything with ``blocks``,
    ``num_prefix_tokens`` and ``forward_intermediates``). Build with the ``timm_vit`` factory or wrap a model
    made by ``timm.create_model(..., num_classes=0)``.

    Prefix tokens (class + register tokens) are dropped from ``patches``. ``cls`` is the class token when the model
    has one (``has_cls``); otherwise, at the last layer, the model's own pooled pre-logits feature
    (``forward_head(pre_logits=True)``: ``map`` attention pool or ``avg`` + ``fc_norm``), else the mean of the
    patches.
    """

    kind = "timm_vit"
    _blocks_path = "model.blocks"

    def __init__(self, model: nn.Module, model_name: str | None = None, layer: int = -1, frozen: bool = True) -> None:
        super().__init__(model_name=model_name or type(model).__name__, layer=layer, frozen=frozen)
        self._wrap(model, ("blocks", "patch_embed", "forward_intermediates"), "a ViT",
                   "; use timm_convnext or another encoder")
        self._select_layer(len(model.blocks))
        self.embed_dim = int(getattr(model, "embed_dim", None) or model.num_features)
        self.image_size = _square(model.patch_embed.img_size, self.model_name)
        self.grid = tuple(int(g) for g in model.patch_embed.grid_size)  # type: ignore[assignment]
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.has_cls = getattr(model, "cls_token", None) is not None
        self._use_data_config()
        self._finish_init()

    def _unused(self) -> list[Any]:
        m = self.model
        out: list[Any] = self._later_blocks() + [getattr(m, "head", None)]
        if not self._is_last:
            out.append(getattr(m, "norm", None))
        if self.has_cls or not self._is_last:  # the pooling head only feeds `cls` of class-token-free models
            out += [getattr(m, "attn_pool", None), getattr(m, "fc_norm", None)]
        return out

    def _encode(self, pixel_values: torch.Tensor) -> EncoderOutput:
        # [B, 3, H, W] -> EncoderOutput(patches [B, N, D], cls [B, D], grid (h, w)); prefix tokens dropped
        out = self.model.forward_intermediates(
            pixel_values,
            indices=[self._index],
            return_prefix_tokens=True,
            norm=self._is_last,  # final norm only for the last block: forward_features() at layer -1
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
        )[0]
        patches, prefix = out if isinstance(out, tuple) else (out, None)  # [B, N, D], [B, P, D] | None
        cls = prefix[:, 0] if self.has_cls and prefix is not None else None
        if cls is None and self._is_last:
            tokens = patches if prefix is None else torch.cat([prefix, patches], dim=1)  # [B, P + N, D]
            cls = self._pooled(tokens, patches.shape[-1])
        return self._output(patches, cls, pixel_values)


class TimmConvNeXtEncoder(_TimmEncoder):
    """A timm ConvNeXt (any model with ``stages``, ``feature_info`` and ``forward_intermediates``).

    ``layer`` selects a stage. ``patches`` is that stage's feature map flattened row-major to ``[B, h*w, C]``
    (the last stage gets ``norm_pre``, as in ``forward_features``). ``cls`` is a pooled feature, never a token
    (``has_cls`` False): at the last stage the model's own head input (global average pool + head norm,
    ``forward_head(pre_logits=True)``), at other stages the mean of the patches.
    """

    kind = "timm_convnext"
    _blocks_path = "model.stages"

    def __init__(
        self, model: nn.Module, model_name: str | None = None, layer: int = -1, frozen: bool = True,
        image_size: int | None = None,
    ) -> None:
        super().__init__(model_name=model_name or type(model).__name__, layer=layer, frozen=frozen)
        self._wrap(model, ("stages", "feature_info", "forward_intermediates"), "a ConvNeXt-style model")
        self._select_layer(len(model.stages))
        info = model.feature_info[self._index]
        self.embed_dim = int(info["num_chs"])
        self.reduction = int(info["reduction"])
        self._use_data_config()
        default_size = _square(self.data_config["input_size"][1:], self.model_name)
        self.image_size = int(image_size) if image_size else default_size
        side = self.image_size // self.reduction
        if side < 1:
            raise ValueError(f"image_size {self.image_size} is too small for stage {layer} (stride {self.reduction})")
        self.grid = (side, side)
        self.has_cls = False
        self._finish_init()

    def _unused(self) -> list[Any]:
        m = self.model
        out: list[Any] = self._later_blocks()
        if not self._is_last:
            out += [getattr(m, "norm_pre", None), getattr(m, "head", None)]
        else:
            out.append(getattr(getattr(m, "head", None), "fc", None))
        return out

    def _encode(self, pixel_values: torch.Tensor) -> EncoderOutput:
        # [B, 3, H, W] -> EncoderOutput(patches [B, h*w, C], cls [B, C], grid (h, w) of the stage's map)
        fmap = self.model.forward_intermediates(
            pixel_values, indices=[self._index], norm=self._is_last, stop_early=True, intermediates_only=True,
        )[0]  # [B, C, h, w]
        h, w = fmap.shape[-2:]
        patches = fmap.flatten(2).transpose(1, 2)  # [B, h*w, C]
        cls = self._pooled(fmap, patches.shape[-1]) if self._is_last else None
        return self._output(patches, cls, pixel_values, grid=(int(h), int(w)))


@register_encoder("timm_vit")
def timm_vit(
    model: str = "vit_base_patch16_224",
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    layer: int = -1,
    image_size: int | None = None,
    frozen: bool = True,
) -> TimmViTEncoder:
    """Any timm ``vit_*`` model (``timm.list_models('vit_*')``, optionally with a pretrained tag
    ``vit_base_patch16_clip_224.openai``). ``checkpoint_path``: a local .safetensors/.pth/.bin loaded by timm's own
    pretrained loader (wins over ``pretrained``). ``image_size`` overrides the model's ``img_size`` (pos-embeds of
    a checkpoint are resized by timm). mean/std come from the model's pretrained_cfg."""
    kwargs: dict[str, Any] = {"num_classes": 0}
    if image_size is not None:
        kwargs["img_size"] = int(image_size)
    net = _timm_create(model, pretrained, checkpoint_path, **kwargs)
    return TimmViTEncoder(net, model_name=model, layer=layer, frozen=frozen)


@register_encoder("timm_convnext")
def timm_convnext(
    model: str = "convnext_tiny",
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    layer: int = -1,
    image_size: int | None = None,
    frozen: bool = True,
) -> TimmConvNeXtEncoder:
    """Any timm ``convnext*`` model; ``layer`` picks the stage (-1 last). ConvNets take any input size, so
    ``image_size`` only sets the expected input side (default: the pretrained_cfg input size) and the grid."""
    net = _timm_create(model, pretrained, checkpoint_path, num_classes=0)
    return TimmConvNeXtEncoder(net, model_name=model, layer=layer, frozen=frozen, image_size=image_size)
