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
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from vlkit.registry import register_encoder
from vlkit.types import EncoderOutput

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


def resolve_layer(layer: int, depth: int) -> int:
    """Non-negative block index for a Python-style ``layer`` over ``depth`` blocks."""
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise TypeError(f"layer must be an int, got {layer!r}")
    if not -depth <= layer < depth:
        raise ValueError(
            f"layer={layer} is out of range for a model with {depth} blocks (valid: {-depth}..{depth - 1})"
        )
    return layer % depth


def _infer_grid(n: int, height: int, width: int) -> tuple[int, int] | None:
    """(h, w) with h * w == n and h / w close to height / width, or None."""
    if n <= 0:
        return None
    h = max(1, round(math.sqrt(n * height / max(width, 1))))
    for cand in (h, h - 1, h + 1):
        if cand > 0 and n % cand == 0:
            return cand, n // cand
    return None


def _triple(values: Any, name: str) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in values)
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise ValueError(f"{name} must have 3 values, got {values!r}")
    return vals  # type: ignore[return-value]


def _display_name(model: str) -> str:
    """The model name used in identity(): the basename for local files/dirs (weights are hashed anyway)."""
    if os.path.exists(model):
        return os.path.basename(os.path.normpath(model)) or model
    return model


def _params_of(item: Any) -> list[nn.Parameter]:
    if item is None:
        return []
    if isinstance(item, nn.Parameter):
        return [item]
    if isinstance(item, nn.Module):
        return list(item.parameters())
    return []


def _square(size: Any, what: str) -> int:
    if isinstance(size, (tuple, list)):
        if len({int(s) for s in size}) != 1:
            raise ValueError(f"{what}: only square inputs are supported, got {tuple(size)}")
        return int(size[0])
    return int(size)


class VisionEncoder(nn.Module):
    """Base class of all vision encoders.

    Attributes every encoder sets: ``kind`` (factory name), ``model_name``, ``embed_dim`` (D of ``patches`` and
    ``cls``), ``image_size`` (side of the square input), ``mean``/``std`` (3 floats each, for normalising
    [0, 1] RGB), ``has_cls`` (a real CLS token, see the module docstring), ``grid`` ((h, w) patch grid at
    ``image_size``), ``layer`` (as given) and ``frozen``. Subclasses implement ``_encode`` and ``blocks``.
    """

    kind: str = "encoder"

    def __init__(self, *, model_name: str, layer: int, frozen: bool) -> None:
        super().__init__()
        self.frozen = bool(frozen)
        self.model_name = model_name
        self.layer = layer
        self.embed_dim: int = 0
        self.image_size: int = 0
        self.mean: tuple[float, float, float] = HALF
        self.std: tuple[float, float, float] = HALF
        self.has_cls: bool = False
        self.grid: tuple[int, int] | None = None
        self._identity: str | None = None
        self._identity_stamp: tuple | None = None

    # ---- shape facts ------------------------------------------------------------------------------------
    @property
    def num_patches(self) -> int:
        """Number of patch tokens at ``image_size`` (h * w of ``grid``)."""
        if self.grid is None:
            raise AttributeError(f"{type(self).__name__} has no fixed patch grid")
        return self.grid[0] * self.grid[1]

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.float32

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    # ---- freezing ---------------------------------------------------------------------------------------
    def freeze(self) -> VisionEncoder:
        """requires_grad=False everywhere and eval mode (kept through later ``.train()`` calls)."""
        self.frozen = True
        for p in self.parameters():
            p.requires_grad_(False)
        return self.train(False)

    def unfreeze(self, params: bool = True) -> VisionEncoder:
        """Stop forcing eval mode; with ``params`` make trainable every parameter that reaches the output.

        Parameters the chosen ``layer`` never uses (blocks after it, the final norm below the last layer, heads
        and projections the output skips) stay frozen, so DDP needs no ``find_unused_parameters``; parameters
        the library itself made non-trainable (e.g. fixed sin-cos position embeddings) stay so too.
        """
        self.frozen = False
        if params:
            unused = {id(p) for item in self._unused() for p in _params_of(item)}
            trainable = getattr(self, "_trainable_at_build", None)
            for name, p in self.named_parameters():
                p.requires_grad_(id(p) not in unused and (trainable is None or name in trainable))
        return self

    def train(self, mode: bool = True) -> VisionEncoder:
        # A frozen encoder stays in eval mode (dropout, drop-path, patch dropout off) whatever the parent does.
        return super().train(bool(mode) and not getattr(self, "frozen", False))

    def _unused(self) -> list[nn.Module | nn.Parameter | None]:
        """Modules/parameters that cannot influence forward()'s output at this ``layer`` (subclasses)."""
        return []

    def _finish_init(self) -> None:
        """Call at the end of a subclass __init__: remembers what the library made trainable, applies ``frozen``."""
        self._trainable_at_build = {n for n, p in self.named_parameters() if p.requires_grad}
        if self.frozen:
            self.freeze()
        else:
            self.unfreeze()

    # ---- identity ---------------------------------------------------------------------------------------
    def _tensor_stamp(self) -> tuple | None:
        """Cheap fingerprint of the tensors' identity and in-place version counters (detects weight updates)."""
        try:
            return tuple((id(t), t.data_ptr(), t._version) for t in self._all_tensors())
        except RuntimeError:  # inference-mode tensors have no version counter
            return None

    def _all_tensors(self) -> Iterator[torch.Tensor]:
        yield from self.parameters()
        yield from self.buffers()

    def identity(self) -> str:
        """A stable key for this encoder's features: ``kind:model:layer<L>:<size>px:<sha256[:16]>``.

        The hash covers every state_dict tensor (name, dtype, shape, bytes), the module structure (``repr``,
        which shows activations and norm eps) and mean/std. It is computed lazily and cached; the cache is dropped
        when a parameter is modified in place (optimizer step, ``load_state_dict``) or replaced, and by
        ``invalidate_identity()``.
        """
        stamp = self._tensor_stamp()
        if self._identity is None or stamp is None or stamp != self._identity_stamp:
            h = hashlib.sha256()
            for name, child in self.named_children():  # structure, without model name / frozen flag
                h.update(f"{name}={child!r}".encode())
            h.update(repr((self.mean, self.std, self.image_size, self.layer)).encode())
            for name, t in self.state_dict().items():
                t = t.detach()
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                if t.numel():
                    h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._identity = (
                f"{self.kind}:{_display_name(self.model_name)}:layer{self.layer}:{self.image_size}px:"
                f"{h.hexdigest()[:16]}"
            )
            self._identity_stamp = stamp
        return self._identity

    def invalidate_identity(self) -> None:
        self._identity = None
        self._identity_stamp = None

    # ---- structure --------------------------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        """Transformer blocks (ConvNeXt: stages) in order, up to and including the one ``layer`` selects.

        Blocks after the selected one do not influence the output, so they are not listed; unfreeze the last
        k with ``for b in enc.blocks()[-k:]: b.requires_grad_(True)``.
        """
        raise NotImplementedError

    # ---- forward ----------------------------------------------------------------------------------------
    def _encode(self, pixel_values: torch.Tensor) -> EncoderOutput:
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        # pixel_values: [B, 3, H, W] normalised with self.mean / self.std, H == W == self.image_size
        # -> EncoderOutput(patches [B, N, D], cls [B, D], grid (h, w)), N == h * w == num_patches, D == embed_dim
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be [B, 3, H, W], got shape {tuple(pixel_values.shape)}")
        if pixel_values.is_floating_point() and pixel_values.dtype != self.dtype:
            pixel_values = pixel_values.to(self.dtype)
        return self._encode(pixel_values)

    def _output_grid(self, n: int, pixel_values: torch.Tensor) -> tuple[int, int] | None:
        if self.grid is not None and n == self.grid[0] * self.grid[1]:
            return self.grid
        return _infer_grid(n, pixel_values.shape[-2], pixel_values.shape[-1])

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, model={self.model_name!r}, layer={self.layer}, frozen={self.frozen}"


# =========================================================================================================
# timm
# =========================================================================================================
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


class TimmViTEncoder(VisionEncoder):
    """A timm ViT (``VisionTransformer``, ``Eva``, relpos and hybrid variants: anything with ``blocks``,
    ``num_prefix_tokens`` and ``forward_intermediates``). Build with the ``timm_vit`` factory or wrap a model
    made by ``timm.create_model(..., num_classes=0)``.

    Prefix tokens (class + register tokens) are dropped from ``patches``. ``cls`` is the class token when the model
    has one (``has_cls``); otherwise, at the last layer, the model's own pooled pre-logits feature
    (``forward_head(pre_logits=True)``: ``map`` attention pool or ``avg`` + ``fc_norm``), else the mean of the
    patches.
    """

    kind = "timm_vit"

    def __init__(self, model: nn.Module, model_name: str | None = None, layer: int = -1, frozen: bool = True) -> None:
        super().__init__(model_name=model_name or type(model).__name__, layer=layer, frozen=frozen)
        for attr in ("blocks", "patch_embed", "forward_intermediates"):
            if not hasattr(model, attr):
                raise TypeError(
                    f"timm model {self.model_name!r} is not a ViT (no '{attr}'); use timm_convnext or another encoder"
                )
        self.model = model
        self.depth = len(model.blocks)
        self._index = resolve_layer(layer, self.depth)
        self._is_last = self._index == self.depth - 1
        self.embed_dim = int(getattr(model, "embed_dim", None) or model.num_features)
        self.image_size = _square(model.patch_embed.img_size, self.model_name)
        self.grid = tuple(int(g) for g in model.patch_embed.grid_size)  # type: ignore[assignment]
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.has_cls = getattr(model, "cls_token", None) is not None
        self.mean, self.std, self.data_config = _timm_mean_std(model)
        self._finish_init()

    def blocks(self) -> list[nn.Module]:
        return list(self.model.blocks[: self._index + 1])

    def _unused(self) -> list[Any]:
        m = self.model
        out: list[Any] = list(m.blocks[self._index + 1:]) + [getattr(m, "head", None)]
        if not self._is_last:
            out.append(getattr(m, "norm", None))
        if self.has_cls or not self._is_last:  # the pooling head only feeds `cls` of class-token-free models
            out += [getattr(m, "attn_pool", None), getattr(m, "fc_norm", None)]
        return out

    def _encode(self, pixel_values: torch.Tensor) -> EncoderOutput:
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
        if self.has_cls and prefix is not None:
            cls = prefix[:, 0]
        else:
            cls = None
            if self._is_last and hasattr(self.model, "forward_head"):
                tokens = patches if prefix is None else torch.cat([prefix, patches], dim=1)
                pooled = self.model.forward_head(tokens, pre_logits=True)
                if pooled.dim() == 2 and pooled.shape[-1] == patches.shape[-1]:
                    cls = pooled
            if cls is None:
                cls = patches.mean(dim=1)
        return EncoderOutput(patches=patches, cls=cls, grid=self._output_grid(patches.shape[1], pixel_values))


class TimmConvNeXtEncoder(VisionEncoder):
    """A timm ConvNeXt (any model with ``stages``, ``feature_info`` and ``forward_intermediates``).

    ``layer`` selects a stage. ``patches`` is that stage's feature map flattened row-major to ``[B, h*w, C]``
    (the last stage gets ``norm_pre``, as in ``forward_features``). ``cls`` is a pooled feature, never a token
    (``has_cls`` False): at the last stage the model's own head input (global average pool + head norm,
    ``forward_head(pre_logits=True)``), at other stages the mean of the patches.
    """

    kind = "timm_convnext"

    def __init__(
        self, model: nn.Module, model_name: str | None = None, layer: int = -1, frozen: bool = True,
        image_size: int | None = None,
    ) -> None:
        super().__init__(model_name=model_name or type(model).__name__, layer=layer, frozen=frozen)
        for attr in ("stages", "feature_info", "forward_intermediates"):
            if not hasattr(model, attr):
                raise TypeError(f"timm model {self.model_name!r} is not a ConvNeXt-style model (no '{attr}')")
        self.model = model
        self.depth = len(model.stages)
        self._index = resolve_layer(layer, self.depth)
        self._is_last = self._index == self.depth - 1
        info = model.feature_info[self._index]
        self.embed_dim = int(info["num_chs"])
        self.reduction = int(info["reduction"])
        self.mean, self.std, self.data_config = _timm_mean_std(model)
        default_size = _square(self.data_config["input_size"][1:], self.model_name)
        self.image_size = int(image_size) if image_size else default_size
        side = self.image_size // self.reduction
        if side < 1:
            raise ValueError(f"image_size {self.image_size} is too small for stage {layer} (stride {self.reduction})")
        self.grid = (side, side)
        self.has_cls = False
        self._finish_init()

    def blocks(self) -> list[nn.Module]:
        return list(self.model.stages[: self._index + 1])

    def _unused(self) -> list[Any]:
        m = self.model
        out: list[Any] = list(m.stages[self._index + 1:])
        if not self._is_last:
            out += [getattr(m, "norm_pre", None), getattr(m, "head", None)]
        else:
            out.append(getattr(getattr(m, "head", None), "fc", None))
        return out

    def _encode(self, pixel_values: torch.Tensor) -> EncoderOutput:
        fmap = self.model.forward_intermediates(
            pixel_values, indices=[self._index], norm=self._is_last, stop_early=True, intermediates_only=True,
        )[0]  # [B, C, h, w]
        h, w = fmap.shape[-2:]
        patches = fmap.flatten(2).transpose(1, 2)  # [B, h*w, C]
        cls = None
        if self._is_last and hasattr(self.model, "forward_head"):
            pooled = self.model.forward_head(fmap, pre_logits=True)
            if pooled.dim() == 2 and pooled.shape[-1] == patches.shape[-1]:
                cls = pooled
        if cls is None:
            cls = patches.mean(dim=1)
        return EncoderOutput(patches=patches, cls=cls, grid=(int(h), int(w)))


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


# =========================================================================================================
# open_clip
# =========================================================================================================
class OpenCLIPEncoder(VisionEncoder):
    """The visual tower of an open_clip model (native ``open_clip.transformer.VisionTransformer`` only; towers
    built from timm models or ModifiedResNet are rejected: use ``timm_vit`` / ``timm_convnext`` for those).

    Runs ``_embeds`` (patchify + class/pos embedding + ``ln_pre``) and the first ``layer`` resblocks. At the last
    layer ``ln_post`` is applied to every token (as open_clip does before pooling); ``proj`` is never applied,
    so ``cls`` and ``patches`` share ``embed_dim`` (the transformer width). ``has_cls`` is True for
    ``pool_type='tok'`` towers without attentional pooling; otherwise ``cls`` is the mean of the patches.
    """

    kind = "open_clip"

    def __init__(self, visual: nn.Module, model_name: str = "open_clip", layer: int = -1, frozen: bool = True) -> None:
        super().__init__(model_name=model_name, layer=layer, frozen=frozen)
        from open_clip.transformer import VisionTransformer

        if not isinstance(visual, VisionTransformer):
            raise NotImplementedError(
                f"open_clip model {model_name!r} has a {type(visual).__name__} vision tower; only open_clip's own "
                "VisionTransformer is supported (use timm_vit / timm_convnext for timm-based towers)"
            )
        self.visual = visual
        self.depth = len(visual.transformer.resblocks)
        self._index = resolve_layer(layer, self.depth)
        self._is_last = self._index == self.depth - 1
        self.embed_dim = int(visual.transformer.width)
        self.image_size = _square(visual.image_size, model_name)
        self.grid = tuple(int(g) for g in visual.grid_size)  # type: ignore[assignment]
        self.has_cls = getattr(visual, "pool_type", "tok") == "tok" and getattr(visual, "attn_pool", None) is None
        pp = dict(getattr(visual, "preprocess_cfg", None) or {})
        self.mean = _triple(pp.get("mean", getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN), "mean")
        self.std = _triple(pp.get("std", getattr(visual, "image_std", None) or OPENAI_CLIP_STD), "std")
        self.preprocess_cfg = pp
        self._finish_init()

    def blocks(self) -> list[nn.Module]:
        return list(self.visual.transformer.resblocks[: self._index + 1])

    def _unused(self) -> list[Any]:
        v = self.visual
        out: list[Any] = list(v.transformer.resblocks[self._index + 1:])
        out += [getattr(v, "proj", None), getattr(v, "attn_pool", None), getattr(v, "attn_pool_contrastive", None)]
        if not self._is_last or getattr(v, "attn_pool", None) is not None:
            out.append(v.ln_post)
        return out

    def _encode(self, pixel_values: torch.Tensor) -> EncoderOutput:
        x = self.visual._embeds(pixel_values)  # [B, 1 + N, W] (class token first), after ln_pre
        _, inter = self.visual.transformer.forward_intermediates(x, indices=[self._index], stop_early=True)
        tokens = inter[0]  # [B, 1 + N, W], batch-first whatever the tower's layout
        if self._is_last and getattr(self.visual, "attn_pool", None) is None:
            tokens = self.visual.ln_post(tokens)
        patches = tokens[:, 1:]
        cls = tokens[:, 0] if self.has_cls else patches.mean(dim=1)
        return EncoderOutput(patches=patches, cls=cls, grid=self._output_grid(patches.shape[1], pixel_values))


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


# =========================================================================================================
# Hugging Face transformers
# =========================================================================================================
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


class HFVisionEncoder(VisionEncoder):
    """A Hugging Face ViT-style vision tower (``CLIPVisionModel``, ``SiglipVisionModel``) kept as ``hf_model``
    for export. Runs it with ``output_hidden_states=True`` and returns ``hidden_states[...]`` for ``layer``
    untouched (see the module docstring). With ``cls_token`` (CLIP) token 0 is ``cls`` and tokens 1: are the
    patches; without (SigLIP) all tokens are patches and ``cls`` is ``pooler_output`` (the attention-pooling
    head) at the last layer, else the mean of the patches."""

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
        self.depth = int(cfg.num_hidden_layers)
        self._index = resolve_layer(layer, self.depth)
        self._is_last = self._index == self.depth - 1
        # hidden_states has depth + 1 entries (0 = embeddings): block i is hidden_states[i + 1]
        self._hs_index = layer if layer < 0 else layer + 1
        self.embed_dim = int(cfg.hidden_size)
        self.image_size = _square(cfg.image_size, model_name)
        side = self.image_size // _square(cfg.patch_size, model_name)
        self.grid = (side, side)
        self.has_cls = bool(cls_token)
        mean = getattr(image_processor, "image_mean", None) or default_mean
        std = getattr(image_processor, "image_std", None) or default_std
        self.mean, self.std = _triple(mean, "mean"), _triple(std, "std")
        self._finish_init()

    def blocks(self) -> list[nn.Module]:
        return list(self.hf_model.encoder.layers[: self._index + 1])

    def _unused(self) -> list[Any]:
        m = self.hf_model
        out: list[Any] = list(m.encoder.layers[self._index + 1:])
        if self.has_cls or not self._is_last:  # CLIP: tokens are never post-normed; SigLIP: pooler only at -1
            out += [getattr(m, "post_layernorm", None), getattr(m, "head", None)]
        return out

    def _encode(self, pixel_values: torch.Tensor) -> EncoderOutput:
        out = self.hf_model(pixel_values=pixel_values, output_hidden_states=True)
        hs = out.hidden_states[self._hs_index]  # [B, T, D]
        if self.has_cls:
            cls, patches = hs[:, 0], hs[:, 1:]
        else:
            patches = hs
            pooled = getattr(out, "pooler_output", None) if self._is_last else None
            cls = pooled if pooled is not None and pooled.dim() == 2 else patches.mean(dim=1)
        return EncoderOutput(patches=patches, cls=cls, grid=self._output_grid(patches.shape[1], pixel_values))


@register_encoder("hf_clip")
def hf_clip(
    model: str = "openai/clip-vit-large-patch14-336",
    layer: int = -1,
    frozen: bool = True,
    trust_remote_code: bool = False,
) -> HFVisionEncoder:
    """``CLIPVisionModel.from_pretrained(model)``: a hub id or a local dir holding a ``CLIPVisionModel`` or a full
    ``CLIPModel`` (its vision tower is taken). LLaVA-1.5 uses ``layer=-2``. mean/std from the dir's
    ``CLIPImageProcessor`` when present, else the OpenAI CLIP constants. The tower is ``.hf_model``."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    net = _hf_load(CLIPVisionModel, model, trust_remote_code)
    proc = _hf_image_processor(CLIPImageProcessor, model, trust_remote_code)
    return HFVisionEncoder(
        net, model_name=model, kind="hf_clip", layer=layer, frozen=frozen, cls_token=True, image_processor=proc,
        default_mean=OPENAI_CLIP_MEAN, default_std=OPENAI_CLIP_STD,
    )


@register_encoder("hf_siglip")
def hf_siglip(
    model: str = "google/siglip-so400m-patch14-384",
    layer: int = -1,
    frozen: bool = True,
    trust_remote_code: bool = False,
) -> HFVisionEncoder:
    """``SiglipVisionModel.from_pretrained(model)`` (hub id, local ``SiglipVisionModel`` or full ``SiglipModel``
    dir). No CLS token: ``patches`` are all tokens, ``has_cls`` is False, ``cls`` is the attention-pooled
    ``pooler_output`` at ``layer=-1`` (mean of patches otherwise). mean/std from the ``SiglipImageProcessor``
    when present, else 0.5/0.5."""
    from transformers import SiglipImageProcessor, SiglipVisionModel

    net = _hf_load(SiglipVisionModel, model, trust_remote_code)
    proc = _hf_image_processor(SiglipImageProcessor, model, trust_remote_code)
    return HFVisionEncoder(
        net, model_name=model, kind="hf_siglip", layer=layer, frozen=frozen, cls_token=False, image_processor=proc,
        default_mean=HALF, default_std=HALF,
    )
