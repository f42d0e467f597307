"""The encoder interface (:class:`VisionEncoder`), the wrapper base every built-in encoder derives from
(:class:`WrappedEncoder`: layer selection over the library's blocks, mean/std, the output record) and their shared
helpers. The conventions are in the package docstring (``vlkit.components.encoders``)."""
from __future__ import annotations

import hashlib
import math
import operator
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from vlkit.types import EncoderOutput

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


class WrappedEncoder(VisionEncoder):
    """A library's vision model wrapped as a :class:`VisionEncoder`: the logic every built-in wrapper shares.

    Feature layer: ``_select_layer(depth)`` resolves ``layer`` over the library's block list (the full model's
    blocks, at the attribute path ``_blocks_path``) into ``depth``, ``_index`` and ``_is_last``; ``blocks()`` lists the blocks up to the
    selected one and ``_later_blocks()`` the ones after it (they never reach the output). Preprocessing:
    ``_set_normalisation`` stores the library's mean/std as 3 floats each. Output: ``_output`` builds the
    :class:`EncoderOutput`, ``cls`` defaulting to the mean of the patches. Subclasses set ``_blocks_path``, name
    the unused modules (``_unused``) and implement ``_encode``.
    """

    _blocks_path: str = ""  # attribute path from the wrapper to the full model's block list, e.g. "model.blocks"
    depth: int
    _index: int
    _is_last: bool

    def _select_layer(self, depth: int) -> None:
        """Resolve ``self.layer`` over ``depth`` blocks (ValueError/TypeError when it is out of range)."""
        self.depth = depth
        self._index = resolve_layer(self.layer, depth)
        self._is_last = self._index == depth - 1

    def _block_list(self) -> Sequence[nn.Module]:
        """Every block (ConvNeXt: stage) of the full model, in order (at ``_blocks_path``)."""
        return operator.attrgetter(self._blocks_path)(self)

    def blocks(self) -> list[nn.Module]:
        return list(self._block_list()[: self._index + 1])

    def _later_blocks(self) -> list[nn.Module]:
        """The blocks after the selected one: they cannot influence the output."""
        return list(self._block_list()[self._index + 1:])

    def _set_normalisation(self, mean: Any, std: Any) -> None:
        self.mean, self.std = _triple(mean, "mean"), _triple(std, "std")

    def _output(self, patches: torch.Tensor, cls: torch.Tensor | None, pixel_values: torch.Tensor,
                grid: tuple[int, int] | None = None) -> EncoderOutput:
        # patches [B, N, D], cls [B, D] or None (-> the mean of the patches), pixel_values [B, 3, H, W]
        # -> EncoderOutput(patches [B, N, D], cls [B, D], grid (h, w): given, else from N and the input's shape)
        if cls is None:
            cls = patches.mean(dim=1)
        return EncoderOutput(patches=patches, cls=cls,
                             grid=grid if grid is not None else self._output_grid(patches.shape[1], pixel_values))
