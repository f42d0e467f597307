"""Assemble a recipe's components into one vision-language model.

encoder -> token strategy -> projector -> M image embeddings -> fusion into the LLM. With ``prefix`` fusion
(LLaVA) they replace the image placeholder in the text embeddings: the collator has already expanded each
``<image>`` into M image-token ids, so splicing is one masked assignment and labels are -100 there. With ``xattn``
fusion (Flamingo) the placeholder is dropped from the text and gated cross-attention layers read the embeddings.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.config import FAMILY_PARAMS, Recipe, family_param_refusal
from vlkit.registry import ENCODERS, FUSIONS, LLMS, PROJECTORS, TOKEN_STRATEGIES
from vlkit.types import EncoderOutput

IGNORE = -100
ENCODER_ATTRS = ("embed_dim", "image_size", "mean", "std")


@dataclass
class VLMOutput:
    loss: torch.Tensor  # mean over supervised tokens of this batch
    loss_sum: torch.Tensor  # sum over supervised tokens (for token-weighted accumulation)
    num_tokens: int  # supervised tokens
    logits: torch.Tensor | None = None  # [S, V] at the supervised positions, when asked for


class VLM(nn.Module):
    def __init__(self, encoder: nn.Module, tokens: nn.Module, projector: nn.Module, llm: nn.Module,
                 fusion: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder, self.tokens, self.projector, self.llm = encoder, tokens, projector, llm
        self.fusion = fusion if fusion is not None else FUSIONS.create("prefix")
        self.num_image_tokens, self.image_grid = self._probe_image_tokens()  # M per image; their (h, w) or None
        order = getattr(self.fusion, "order", None)
        self._order = order(self.image_grid) if self.fusion.in_sequence and order else None
        self._span: list[int] | None = None

    @property
    def sequence_image_tokens(self) -> int:
        """Positions an image takes in the text sequence: M for prefix fusion, 0 for cross-attention fusion."""
        return self.num_image_tokens if self.fusion.in_sequence else 0

    @property
    def image_span(self) -> list[int]:
        """The ids one ``<image>`` placeholder expands to in the text: M image-token ids for prefix fusion (with the
        cell names between them when the fusion has ``cells`` and the tokens a grid), none for cross-attention."""
        if self._span is None:
            self._span = fusion_span(self.fusion, self.tokenizer, self.image_token_id, self.num_image_tokens,
                                     self.image_grid)
        return list(self._span)

    @property
    def cells_note(self) -> str | None:
        """Why ``fusion.cells`` names no cells for these image tokens, when it is set and does not."""
        return cells_note(self.fusion, self.num_image_tokens, self.image_grid)

    @property
    def image_token_id(self) -> int:
        return self.llm.image_token_id

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    def _probe_image_tokens(self) -> tuple[int, tuple[int, int] | None]:
        device = next(self.projector.parameters(), torch.empty(0)).device
        return probe_image_tokens(self.encoder, self.tokens, self.projector, device)

    # ---- images ---------------------------------------------------------------------------------------------
    def encoder_features(self, pixel_values: torch.Tensor) -> EncoderOutput:
        # [B, 3, H, W] -> EncoderOutput(patches [B, N, D_vis], cls [B, D_vis] | None)
        return self.encoder(pixel_values)

    def project(self, features: EncoderOutput) -> torch.Tensor:
        # EncoderOutput -> [B, M, D_llm]
        return self.projector(self.tokens(features))

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # [B, 3, H, W] -> [B, M, D_llm]
        return self.project(self.encoder_features(pixel_values))

    # ---- splicing -------------------------------------------------------------------------------------------
    def embed_inputs(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        # input_ids [B, T] (each image already expanded to M image-token ids), image_embeds [I, M, D] -> [B, T, D]
        is_image = input_ids == self.image_token_id
        ids = input_ids.masked_fill(is_image, 0)
        embeds = self.llm.embed_tokens(ids)
        n_slots = int(is_image.sum())
        n_given = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        if n_slots != n_given:
            raise ValueError(
                f"image tokens in the text ({n_slots}) != image embeddings produced ({n_given}); each <image> "
                f"placeholder must expand to exactly {self.num_image_tokens} image tokens"
            )
        if n_slots:
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))
        return embeds

    def _image_embeds(self, pixel_values: torch.Tensor | None, features: EncoderOutput | None) -> torch.Tensor | None:
        if features is not None:
            return self.project(features)
        if pixel_values is not None and pixel_values.shape[0]:
            return self.encode_images(pixel_values)
        return None

    def fuse(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None,
             image_index: torch.Tensor | None) -> torch.Tensor:
        # input_ids [B, T], image_embeds [I, M, D], image_index [I] (sample of each image) -> inputs_embeds [B, T, D]
        if self.fusion.in_sequence:
            if image_embeds is not None and self._order is not None:
                image_embeds = image_embeds[:, self._order]  # [I, M, D] in the span's order (cell by cell)
            return self.embed_inputs(input_ids, image_embeds)
        b = input_ids.shape[0]
        if image_embeds is None:
            self.fusion.set_context(None, None)
        else:
            if image_index is None:
                raise ValueError("cross-attention fusion needs image_index (the sample each image belongs to)")
            ctx = image_embeds.new_zeros(b, *image_embeds.shape[1:])
            ctx[image_index] = image_embeds
            has = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
            has[image_index] = True
            self.fusion.set_context(ctx, has)
        return self.embed_inputs(input_ids, None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, features: EncoderOutput | None = None,
                image_index: torch.Tensor | None = None, return_logits: bool = False) -> VLMOutput:
        # input_ids/attention_mask/labels [B, T], pixel_values [I, 3, H, W] -> loss over supervised tokens
        embeds = self.fuse(input_ids, self._image_embeds(pixel_values, features), image_index)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        hidden = self.llm.hidden_states(embeds, attention_mask, position_ids)
        if labels is None:
            raise ValueError("VLM.forward needs labels; use generate() for inference")
        # LM head and loss only at supervised positions (prompt and image positions never reach the head)
        target = labels[:, 1:]
        keep = target != IGNORE
        logits = self.llm.logits(hidden[:, :-1][keep]).float()
        loss_sum = F.cross_entropy(logits, target[keep], reduction="sum")
        n = int(keep.sum())
        loss = loss_sum / max(n, 1)
        return VLMOutput(loss=loss, loss_sum=loss_sum, num_tokens=n, logits=logits if return_logits else None)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 features: EncoderOutput | None = None, image_index: torch.Tensor | None = None,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0) -> torch.Tensor:
        # input_ids [B, T] left-padded prompts -> [B, <=max_new_tokens] new token ids
        embeds = self.fuse(input_ids, self._image_embeds(pixel_values, features), image_index)
        tok = self.tokenizer
        eos = [i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} if isinstance(i, int) and i >= 0]
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                      pad_token_id=tok.pad_token_id, eos_token_id=eos or None)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        return self.llm.model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)


def resolve_ref(value: Any) -> Any:
    """A recipe value as a path or model name: ``toy:...`` references point into the embedded default (built on first
    use); anything else is returned as it is."""
    if isinstance(value, str) and value.startswith("toy:"):
        from vlkit.toyworld import resolve_toy

        return resolve_toy(value)
    return value


def _resolved_params(params: dict[str, Any]) -> dict[str, Any]:
    return {k: resolve_ref(v) for k, v in params.items()}


def _check_encoder(encoder: Any, name: str) -> None:
    missing = [a for a in ENCODER_ATTRS if not hasattr(encoder, a)]
    if missing or not isinstance(encoder, nn.Module):
        raise TypeError(
            f"encoder '{name}' ({ENCODERS.source(name)}) breaks the plugin contract: it must be an nn.Module with "
            f"attributes {', '.join(ENCODER_ATTRS)}; missing: {', '.join(missing) or 'not an nn.Module'}"
        )


def token_params(recipe: Recipe, grid: tuple[int, int] | None) -> dict[str, Any]:
    """The token strategy's factory arguments: the recipe's ``tokens:`` keys, ``num_tokens`` (None when unset) and,
    for a factory with a ``grid`` parameter (``merged``), the encoder's patch grid (docs/plugins.md)."""
    import inspect

    params = {"num_tokens": None, **_resolved_params(recipe.tokens.params())}
    try:
        wants_grid = "grid" in inspect.signature(TOKEN_STRATEGIES.get(recipe.tokens.name)).parameters
    except (TypeError, ValueError):  # a factory without a readable signature gets no grid
        wants_grid = False
    if wants_grid:
        params["grid"] = None if grid is None else (int(grid[0]), int(grid[1]))
    return params


def build_vision(recipe: Recipe, out_dim: int, text_norm: float | None = None) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The recipe's encoder, token strategy and a projector into ``out_dim``; a projector factory that declares
    ``text_norm`` is given it (the LLM's mean input-embedding norm; None when no LLM is built)."""
    enc_cfg, tok_cfg, proj_cfg = recipe.encoder, recipe.tokens, recipe.projector
    encoder = ENCODERS.create(enc_cfg.name, **_resolved_params(enc_cfg.params()))
    _check_encoder(encoder, enc_cfg.name)
    tok_params = token_params(recipe, getattr(encoder, "grid", None))
    tokens = TOKEN_STRATEGIES.create(tok_cfg.name, **tok_params)
    in_dim = tokens.out_dim(int(encoder.embed_dim)) if hasattr(tokens, "out_dim") else int(encoder.embed_dim)
    proj_params = _resolved_params(proj_cfg.params())
    proj_params.setdefault("num_tokens", tok_params["num_tokens"])
    for key in FAMILY_PARAMS["projector"]:
        # kept when a recipe or grid swaps the projector; a factory without it can only do without: null asks for
        # nothing (load_recipe refuses anything else; this is for recipes built in code)
        if key in proj_params and not PROJECTORS.accepts(proj_cfg.name, key):
            value = proj_params.pop(key)
            if value is not None:
                raise ValueError(family_param_refusal("projector", proj_cfg.name, key, value,
                                                      PROJECTORS.source(proj_cfg.name)))
    if "text_norm" in inspect.signature(PROJECTORS.get(proj_cfg.name)).parameters:
        proj_params["text_norm"] = text_norm
    projector = PROJECTORS.create(proj_cfg.name, in_dim=in_dim, out_dim=out_dim, **proj_params)
    return encoder, tokens, projector


def build_model(recipe: Recipe) -> VLM:
    """Build the recipe's encoder, token strategy, projector and LLM and assemble them."""
    llm = LLMS.create(recipe.llm.name, **_resolved_params(recipe.llm.params()))
    encoder, tokens, projector = build_vision(recipe, llm.hidden_size, text_embedding_norm(llm))
    fusion_params = _resolved_params(recipe.fusion.params())
    factory = FUSIONS.get(recipe.fusion.name)
    if "llm" in inspect.signature(factory).parameters:
        fusion_params["llm"] = llm
    fusion = FUSIONS.create(recipe.fusion.name, **fusion_params)
    return VLM(encoder, tokens, projector, llm, fusion)


@torch.no_grad()
def text_embedding_norm(llm: nn.Module, chunk: int = 8192) -> float:
    """Mean L2 norm of the LLM's input embeddings over its tokenizer's base vocabulary (added tokens, the image
    token among them, and the embedding matrix's padding rows left out). What ``out_norm: text`` starts image
    tokens at. Deterministic: it reads weights only."""
    n = int(getattr(llm.tokenizer, "vocab_size", 0) or len(llm.tokenizer))
    total = 0.0
    for start in range(0, n, chunk):
        ids = torch.arange(start, min(n, start + chunk)).unsqueeze(0)
        total += float(llm.embed_tokens(ids).float().norm(dim=-1).sum())
    return total / n


def load_tokenizer(recipe: Recipe):
    """The recipe LLM's tokenizer with the image token added, without loading the LLM's weights."""
    from transformers import AutoTokenizer

    params = _resolved_params(recipe.llm.params())
    tok = AutoTokenizer.from_pretrained(params.get("tokenizer") or params["model"],
                                        trust_remote_code=bool(params.get("trust_remote_code", False)))
    image_token = params.get("image_token", "<image>")
    if image_token not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [image_token]})
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, tok.convert_tokens_to_ids(image_token)


def probe_image_tokens(encoder: nn.Module, tokens: nn.Module, projector: nn.Module,
                       device: torch.device | None = None) -> tuple[int, tuple[int, int] | None]:
    """M image tokens per image, and their (h, w) row-major layout when the token strategy and projector keep one:
    one blank image through encoder, token strategy and projector."""
    size = int(encoder.image_size)
    with torch.no_grad():
        features = encoder(torch.zeros(1, 3, size, size, device=device))
        m = int(projector(tokens(features)).shape[1])
    return m, token_grid(tokens, projector, features.grid, m)


def token_grid(tokens: nn.Module, projector: nn.Module, encoder_grid: tuple[int, int] | None,
               num_tokens: int) -> tuple[int, int] | None:
    """The image tokens' (h, w) row-major layout through the token strategy and the projector (each says it with
    the optional ``token_grid(grid)``; a component without it keeps no layout), or None."""
    grid = encoder_grid
    for part in (tokens, projector):
        keep = getattr(part, "token_grid", None)
        grid = keep(grid) if keep is not None and grid is not None else None
    if grid is None or grid[0] * grid[1] != num_tokens:
        return None
    return int(grid[0]), int(grid[1])


def fusion_span(fusion: nn.Module, tokenizer, image_token_id: int, num_tokens: int,
                grid: tuple[int, int] | None) -> list[int]:
    """The ids an ``<image>`` placeholder becomes under ``fusion``: none when the image is not in the sequence."""
    if not fusion.in_sequence:
        return []
    span = getattr(fusion, "span", None)
    if span is None:
        return [image_token_id] * num_tokens
    return span(tokenizer, image_token_id, num_tokens, grid)


def cells_note(fusion: nn.Module, num_tokens: int, grid: tuple[int, int] | None) -> str | None:
    cells = getattr(fusion, "cells", None)
    groups = getattr(fusion, "cell_groups", None)
    if not cells or not fusion.in_sequence or groups is None or groups(grid) is not None:
        return None
    g = math.isqrt(len(cells))
    why = ("have no 2-D layout (the token strategy or projector keeps none)" if grid is None
           else f"form a {grid[0]} x {grid[1]} grid, coarser than the {g} x {g} cells")
    return f"fusion.cells: the {num_tokens} image token(s) {why}; they go in without cell names"


def image_span_for(recipe: Recipe, tokenizer, image_token_id: int) -> list[int]:
    """What ``VLM.image_span`` would be for ``recipe``, without loading the LLM's weights unless the fusion needs
    the LLM to be built (cross-attention): then the whole model is built and asked."""
    import inspect

    if "llm" in inspect.signature(FUSIONS.get(recipe.fusion.name)).parameters:
        return build_model(recipe).image_span
    m, grid = probe_image_tokens(*build_vision(recipe, out_dim=8))
    fusion = FUSIONS.create(recipe.fusion.name, **_resolved_params(recipe.fusion.params()))
    return fusion_span(fusion, tokenizer, image_token_id, m, grid)


def count_image_tokens(recipe: Recipe) -> int:
    """Image tokens per image for a recipe, from its encoder, token strategy and projector (no LLM)."""
    return probe_image_tokens(*build_vision(recipe, out_dim=8))[0]


def parameter_counts(model: VLM) -> dict[str, dict[str, int]]:
    """Trainable and frozen parameters per component."""
    out = {}
    for part in ("encoder", "tokens", "projector", "fusion", "llm"):
        mod = getattr(model, part)
        trainable = sum(p.numel() for p in mod.parameters() if p.requires_grad)
        total = sum(p.numel() for p in mod.parameters())
        out[part] = {"trainable": trainable, "frozen": total - trainable, "total": total}
    return out
