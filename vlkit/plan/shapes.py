"""Model shapes for the planner: what the LLM, the vision encoder and the projector of a recipe are (parameter
counts, widths, depths, tokens), from their configs in closed form or from the model built on the ``meta``
device. transformers, timm and open_clip are imported only for the architectures that need them."""
from __future__ import annotations

import contextlib
import inspect
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlkit.components.encoders import resolve_layer
from vlkit.config import Recipe
from vlkit.model import _resolved_params, token_params
from vlkit.plan.configs import CONFIG_DEFAULTS, _dtype_bytes, _sub, _with_type_defaults, load_config
from vlkit.registry import ENCODERS, LLMS, PROJECTORS, TOKEN_STRATEGIES
from vlkit.types import EncoderOutput

# ---- architecture facts ----------------------------------------------------------------------------------------
@dataclass
class LLMSpec:
    name: str
    source: str
    dtype_bytes: int
    params: int
    embed_params: int  # input embedding (largest single module for ZeRO-3 gathering)
    layer_params: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool
    layer_linears: list[tuple[str, int, int]]  # (full name of layer 0's linears, in, out)
    notes: list[str] = field(default_factory=list)


@dataclass
class EncoderSpec:
    name: str
    kind: str
    source: str
    dtype_bytes: int
    params: int
    hidden: int
    intermediate: int
    depth: int  # blocks in the model
    used_blocks: int  # blocks up to the selected layer
    tokens: int  # tokens per image inside the encoder (patches + prefix tokens)
    patches: int
    has_cls: bool
    grid: tuple[int, int] | None
    block_params: int
    unused_params: int  # blocks after the selected layer, unused norms/heads
    keeps_all_hidden: bool  # HF towers return every hidden state (output_hidden_states=True)
    act_saves: int  # MLP intermediates kept per trainable block (quick_gelu 2 + fc2 input)
    frozen: bool = True
    notes: list[str] = field(default_factory=list)


@dataclass
class VisionSpec:
    image_tokens: int  # M: LLM positions per image
    projector_params: int
    projector_saved_bytes_fp32: int  # per image, meta run
    tokens_params: int
    notes: list[str] = field(default_factory=list)


def _with_defaults(registry: Any, name: str, params: dict[str, Any]) -> dict[str, Any]:
    try:
        sig = inspect.signature(registry.get(name))
    except Exception:  # noqa: BLE001 - a broken plugin: no defaults
        return dict(params)
    out = {k: p.default for k, p in sig.parameters.items()
           if p.default is not inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD}
    out.update(params)
    return out


def _nparams(mod: nn.Module | None) -> int:
    return 0 if mod is None else sum(p.numel() for p in mod.parameters())


def _layer_list(model: nn.Module, n: int) -> tuple[str, nn.ModuleList] | None:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return name, mod
    return None


# ---- the LLM --------------------------------------------------------------------------------------------------
def _llm_from_config(cfg: dict[str, Any], name: str, source: str, dtype_bytes: int, path: str | None,
                     trust_remote_code: bool = False) -> LLMSpec:
    """Counts in closed form for the Qwen2/Qwen3/Llama/Mistral families, else by building the model on meta."""
    cfg = _with_type_defaults(cfg)
    mt = cfg.get("model_type", "")
    if mt in ("qwen2", "qwen3", "llama", "mistral"):
        h, n_layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        hd = int(cfg.get("head_dim") or h // heads)
        inter, vocab = int(cfg["intermediate_size"]), int(cfg["vocab_size"])
        qkv_bias = True if mt == "qwen2" else bool(cfg.get("attention_bias", False))
        o_bias = bool(cfg.get("attention_bias", False)) and mt != "qwen2"
        mlp_bias = bool(cfg.get("mlp_bias", False))
        p = "model.layers.0."
        linears = [(p + "self_attn.q_proj", h, heads * hd), (p + "self_attn.k_proj", h, kv * hd),
                   (p + "self_attn.v_proj", h, kv * hd), (p + "self_attn.o_proj", heads * hd, h),
                   (p + "mlp.gate_proj", h, inter), (p + "mlp.up_proj", h, inter), (p + "mlp.down_proj", inter, h)]
        layer = sum(i * o for _, i, o in linears) + 2 * h
        layer += (heads + 2 * kv) * hd if qkv_bias else 0
        layer += h if o_bias else 0
        layer += (2 * inter + h) if mlp_bias else 0
        layer += 2 * hd if mt == "qwen3" else 0  # q_norm, k_norm
        embed = vocab * h
        total = embed + n_layers * layer + h + (0 if cfg.get("tie_word_embeddings") else embed)
        return LLMSpec(name=name, source=source + ", closed-form count", dtype_bytes=dtype_bytes, params=total,
                       embed_params=embed, layer_params=layer, hidden=h, layers=n_layers, heads=heads, kv_heads=kv,
                       head_dim=hd, intermediate=inter, vocab=vocab, gated_mlp=True, layer_linears=linears)
    # any other architecture: transformers' own class, instantiated on the meta device (no memory, exact counts)
    from transformers import AutoConfig, AutoModelForCausalLM

    if path is not None:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    else:
        d = dict(cfg)
        config = AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = int(getattr(text, "hidden_size", None) or lm.get_input_embeddings().embedding_dim)
    n_layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    kv = int(getattr(text, "num_key_value_heads", None) or heads)
    hd = int(getattr(text, "head_dim", None) or h // heads)
    inter = int(getattr(text, "intermediate_size", None) or 4 * h)
    found = _layer_list(lm, n_layers) if n_layers else None
    linears: list[tuple[str, int, int]] = []
    layer_params = 0
    gated = True
    if found is not None:
        prefix, mods = found
        layer_params = _nparams(mods[0])
        linears = [(f"{prefix}.0.{n}", m.in_features, m.out_features) for n, m in mods[0].named_modules()
                   if isinstance(m, nn.Linear)]
        gated = bool(re.search(r"gate|w1|w3|up_proj", " ".join(n for n, _, _ in linears)))
    return LLMSpec(name=name, source=source + ", counted on the meta device", dtype_bytes=dtype_bytes,
                   params=_nparams(lm), embed_params=_nparams(lm.get_input_embeddings()), layer_params=layer_params,
                   hidden=h, layers=n_layers, heads=heads, kv_heads=kv, head_dim=hd, intermediate=inter,
                   vocab=int(lm.get_input_embeddings().num_embeddings), gated_mlp=gated, layer_linears=linears)


def describe_llm(recipe: Recipe, online: bool | None = None) -> LLMSpec:
    comp = recipe.llm
    params = _with_defaults(LLMS, comp.name, comp.params())
    if comp.name != "hf":
        return _unknown_llm(comp.name, params)
    model = str(params.get("model"))
    loaded = load_config(model, online)
    cfg = _sub(loaded.data, "text_config", "") if "hidden_size" not in loaded.data else loaded.data
    dtype = _dtype_bytes(params.get("dtype") or "float32")
    return _llm_from_config(cfg, model, loaded.source, dtype, loaded.path, bool(params.get("trust_remote_code")))


def _unknown_llm(name: str, params: dict[str, Any]) -> LLMSpec:
    return LLMSpec(name=name, source="unknown (plugin LLM: no config to read; counted as 0)", dtype_bytes=4,
                   params=0, embed_params=0, layer_params=0, hidden=0, layers=0, heads=1, kv_heads=1, head_dim=0,
                   intermediate=0, vocab=0, gated_mlp=True, layer_linears=[],
                   notes=[f"llm '{name}' is not the built-in 'hf' family: its memory is not estimated"])


# ---- the vision encoder ---------------------------------------------------------------------------------------
def _hf_vision_spec(kind: str, model: str, layer: int, frozen: bool, online: bool | None) -> EncoderSpec:
    """CLIP / SigLIP vision towers in closed form (the parameter layout of transformers' CLIPVisionModel and
    SiglipVisionModel)."""
    loaded = load_config(model, online)
    is_clip = kind == "hf_clip"
    mt = "clip_vision_model" if is_clip else "siglip_vision_model"
    cfg = _sub(loaded.data, "vision_config", mt)
    dtype = _dtype_bytes(cfg.get("dtype") or cfg.get("torch_dtype") or loaded.data.get("dtype")
                         or loaded.data.get("torch_dtype"), 4)
    cfg = {**CONFIG_DEFAULTS[mt], **{k: v for k, v in cfg.items() if k != "model_type"}}
    d, inter, depth = int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"])
    size, patch, ch = int(cfg["image_size"]), int(cfg["patch_size"]), int(cfg.get("num_channels", 3))
    side = size // patch
    n = side * side
    block = 4 * (d * d + d) + 2 * 2 * d + (d * inter + inter) + (inter * d + d)
    if is_clip:
        embed = ch * patch * patch * d + d + (n + 1) * d + 2 * d  # conv (no bias), class emb, positions, pre-LN
        post, head = 2 * d, 0
    else:
        embed = ch * patch * patch * d + d + n * d  # conv with bias, positions
        post = 2 * d
        head = 0
        if cfg.get("vision_use_head", True):  # attention-pooling head: probe, MHA, LayerNorm, MLP
            head = d + 4 * d * d + 4 * d + 2 * d + d * inter + inter + inter * d + d
    index = resolve_layer(layer, depth)
    unused = (depth - index - 1) * block
    if is_clip or index != depth - 1:
        unused += post + head  # CLIP tokens are never post-normed; SigLIP's pooler only at the last layer
    act = str(cfg.get("hidden_act", "gelu"))
    return EncoderSpec(
        name=model, kind=kind, source=loaded.source + ", closed-form count", dtype_bytes=dtype,
        params=embed + depth * block + post + head, hidden=d, intermediate=inter, depth=depth, used_blocks=index + 1,
        tokens=n + (1 if is_clip else 0), patches=n, has_cls=is_clip, grid=(side, side), block_params=block,
        unused_params=unused, keeps_all_hidden=True, act_saves=3 if act == "quick_gelu" else 2, frozen=frozen,
    )

def _module_vision_spec(kind: str, name: str, net: nn.Module, blocks: list[nn.Module], layer: int, frozen: bool,
                        embed_dim: int, image_size: int, grid: tuple[int, int], prefix: int,
                        source: str) -> EncoderSpec:
    depth = len(blocks)
    index = resolve_layer(layer, depth)
    inter = 4 * embed_dim
    for m in blocks[0].modules():
        if isinstance(m, nn.Linear) and m.out_features > embed_dim:
            inter = m.out_features
            break
    n = grid[0] * grid[1]
    return EncoderSpec(
        name=name, kind=kind, source=source, dtype_bytes=4, params=_nparams(net), hidden=embed_dim,
        intermediate=inter, depth=depth, used_blocks=index + 1, tokens=n + prefix, patches=n, has_cls=prefix > 0,
        grid=grid, block_params=_nparams(blocks[0]), unused_params=sum(_nparams(b) for b in blocks[index + 1:]),
        keeps_all_hidden=False, act_saves=2, frozen=frozen,
    )


def describe_encoder(recipe: Recipe, online: bool | None = None) -> EncoderSpec:
    """The recipe's encoder as an EncoderSpec, from its config or its model definition on the meta device."""
    comp = recipe.encoder
    params = _with_defaults(ENCODERS, comp.name, comp.params())
    layer, frozen = int(params.get("layer", -1)), bool(params.get("frozen", True))
    model = str(params.get("model"))
    if comp.name in ("hf_clip", "hf_siglip"):
        return _hf_vision_spec(comp.name, model, layer, frozen, online)
    if comp.name in ("timm_vit", "timm_convnext"):
        return _timm_spec(comp.name, model, params, layer, frozen)
    if comp.name == "open_clip":
        import open_clip as oc

        with torch.device("meta"):
            full = oc.create_model(model, pretrained=None, device="meta")
        v = full.visual
        grid = tuple(int(g) for g in v.grid_size)
        size = v.image_size[0] if isinstance(v.image_size, (tuple, list)) else v.image_size
        return _module_vision_spec(comp.name, model, v, list(v.transformer.resblocks), layer, frozen,
                                   int(v.transformer.width), int(size), grid, 1,
                                   "open_clip model definition (meta device)")
    return _plugin_spec(comp.name, comp.params(), params, frozen)


def _timm_spec(name: str, model: str, params: dict[str, Any], layer: int, frozen: bool) -> EncoderSpec:
    import timm

    kwargs: dict[str, Any] = {"num_classes": 0}
    if name == "timm_vit" and params.get("image_size"):
        kwargs["img_size"] = int(params["image_size"])
    with torch.device("meta"):
        net = timm.create_model(model, pretrained=False, **kwargs)
    if name == "timm_vit":
        grid = tuple(int(g) for g in net.patch_embed.grid_size)
        size = int(net.patch_embed.img_size[0])
        return _module_vision_spec(name, model, net, list(net.blocks), layer, frozen, int(net.embed_dim),
                                   size, grid, int(getattr(net, "num_prefix_tokens", 1)),
                                   "timm model definition (meta device)")
    size = int(params.get("image_size") or net.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    stages = list(net.stages)
    idx = layer % len(stages)
    reduction = 4 * 2 ** idx
    dim = int(net.feature_info[idx]["num_chs"]) if hasattr(net, "feature_info") else int(net.num_features)
    spec = _module_vision_spec(name, model, net, stages, layer, frozen, dim, size,
                               (size // reduction, size // reduction), 0, "timm model definition (meta device)")
    spec.notes.append("ConvNeXt stage activations use the ViT-block formula (rough)")
    return spec


def _plugin_spec(name: str, given: dict[str, Any], params: dict[str, Any], frozen: bool) -> EncoderSpec:
    """A plugin encoder built on the meta device when its factory allows; else an 'unknown' spec that says why."""
    try:
        with torch.device("meta"), _offline():
            enc = ENCODERS.create(name, **given)
        grid = tuple(enc.grid) if getattr(enc, "grid", None) else (1, 1)
        blocks = enc.blocks() if hasattr(enc, "blocks") else []
        n = grid[0] * grid[1]
        return EncoderSpec(
            name=name, kind=name, source="plugin factory on the meta device", dtype_bytes=4,
            params=_nparams(enc), hidden=int(enc.embed_dim), intermediate=4 * int(enc.embed_dim),
            depth=len(blocks), used_blocks=len(blocks), tokens=n + (1 if getattr(enc, "has_cls", False) else 0),
            patches=n, has_cls=bool(getattr(enc, "has_cls", False)), grid=grid,
            block_params=_nparams(blocks[0]) if blocks else 0, unused_params=0, keeps_all_hidden=False,
            act_saves=2, frozen=frozen, notes=["plugin encoder: activations use the ViT-block formula"])
    except Exception as exc:  # noqa: BLE001 - unknown plugin: reported in the spec's source and notes
        return EncoderSpec(
            name=name, kind=name, source=f"unknown ({type(exc).__name__}: {exc})"[:160], dtype_bytes=4,
            params=0, hidden=int(params.get("embed_dim", 0) or 0), intermediate=0, depth=0, used_blocks=0, tokens=1,
            patches=1, has_cls=False, grid=(1, 1), block_params=0, unused_params=0, keeps_all_hidden=False,
            act_saves=2, frozen=frozen, notes=[f"encoder '{name}' could not be described: not estimated"])


@contextlib.contextmanager
def _offline():
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def saved_bytes(fn: Any, params: list[nn.Parameter]) -> int:
    """Bytes autograd saves for backward while ``fn()`` runs (excluding parameters), one count per storage."""
    ids = {id(p) for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(t) in ids or id(base) in ids:
            return t
        seen[id(base)] = max(seen.get(id(base), 0), base.numel() * base.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def describe_vision(recipe: Recipe, enc: EncoderSpec, llm_hidden: int) -> VisionSpec:
    """Image tokens per image, and the projector's parameters and saved activations, from one small CPU run of the
    recipe's token strategy and projector on a zero feature map of the encoder's shape (one image)."""
    notes: list[str] = []
    d, out_dim = max(enc.hidden, 1), max(llm_hidden, 1)
    tok_params = token_params(recipe, enc.grid)
    tokens = TOKEN_STRATEGIES.create(recipe.tokens.name, **tok_params)
    in_dim = tokens.out_dim(d) if hasattr(tokens, "out_dim") else d
    proj_params = _resolved_params(recipe.projector.params())
    proj_params.setdefault("num_tokens", tok_params["num_tokens"])
    projector = PROJECTORS.create(recipe.projector.name, in_dim=in_dim, out_dim=out_dim, **proj_params)
    feats = EncoderOutput(patches=torch.zeros(1, enc.patches, d), cls=torch.zeros(1, d), grid=enc.grid)
    out_holder: list[torch.Tensor] = []

    def run() -> None:
        out_holder.append(projector(tokens(feats)))

    try:
        saved = saved_bytes(run, list(projector.parameters()))
        m = int(out_holder[0].shape[1])
    except Exception as exc:  # noqa: BLE001 - a projector/strategy that cannot run on this feature map
        notes.append(f"projector could not run on a {enc.patches}x{d} feature map ({type(exc).__name__}: {exc}); "
                     "its activations are approximated")
        m = enc.patches if recipe.tokens.name == "patch" else int(tok_params.get("num_tokens") or 1)
        saved = 3 * m * out_dim * 4
    return VisionSpec(image_tokens=m, projector_params=_nparams(projector), projector_saved_bytes_fp32=saved,
                      tokens_params=_nparams(tokens), notes=notes)
