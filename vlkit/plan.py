"""``vlkit plan``: per-GPU training memory of each stage of a recipe, without downloading or building the model.

What is counted (bytes are decimal: 1 GB = 10^9 bytes)
------------------------------------------------------
weights
    Every parameter in its storage dtype (LLM: the recipe's ``llm.dtype``; HF encoders: the checkpoint's dtype,
    as transformers' ``dtype="auto"`` loads them; projector and LoRA adapters: fp32, as vlkit and peft create
    them). ZeRO-3 shards all of them (frozen ones too) across ``gpus``.
gradients
    Trainable parameters only, in the parameter dtype. Sharded from ZeRO-2 on.
optimizer
    AdamW: two fp32 moments per trainable parameter, plus an fp32 master copy when the parameter itself is
    16-bit (mixed precision): 8 or 12 bytes per parameter. Sharded from ZeRO-1 on.
activations
    What autograd keeps for backward at the peak (the start of the backward pass of one micro-batch). vlkit's
    micro-batch ``batch_size / grad_accum`` is global: with several GPUs each takes ``1/gpus`` of it
    (``vlkit.distributed.shard_batch``). Sequence length: ``data.max_length`` (or ``seq_len``), image tokens
    included. Per decoder layer and token (``a`` = compute bytes: 2 under bf16/fp16 autocast on a GPU, 4 in
    fp32): the two RMSNorm inputs in fp32 (8h), SDPA's q, k, v, output (k/v repeated to all heads when a padding
    mask is present, as transformers does) and its logsumexp, the per-layer attention-mask bias SDPA keeps
    (B x T x T in the compute dtype; no T x T attention probabilities), and the gated MLP's 3 intermediates.
    Trainable weights add the tensors their gradients need (the normed inputs and the down-projection input for
    ``llm: full``; each LoRA adapter's (dropped-out) input, its dropout mask and its rank-r projection for
    ``llm: lora``). With gradient checkpointing only every layer's input is kept, plus one recomputed layer. A
    frozen LLM still keeps what input gradients need (the projector is trained through it). The LM head runs on
    the supervised positions only (``supervised_frac`` of the tokens): fp32 log-probabilities plus two gradient
    buffers of that size. The backward pass adds the gradient buffers in flight inside the last layer (about one
    intermediate-size and two hidden-size gradients per token). Gradients stack on this peak only when they
    persist (grad_accum > 1, several GPUs, ZeRO); otherwise they replace activations freed during the backward
    pass. A frozen vision encoder keeps nothing for backward, but its forward pass briefly holds every hidden
    state (HF towers return them all): the larger of the two phases counts. Unfrozen encoder blocks keep their
    activations. The projector's saved tensors are measured by running it once on a zero feature map (CPU).
overhead
    A fixed allowance for the CUDA context, cuBLAS/NCCL workspaces and allocator slack (``overhead_gb``); 0 for
    ``device="cpu"``. ZeRO-3 also holds the gathered parameters of the largest module plus one prefetched layer.

Architecture facts come from the component configs: a local directory's ``config.json`` (``toy:`` paths once the
toy world is built), else the HF cache, else a built-in table of the published configs of the models the shipped
recipes use, else the hub (only when online). Parameters are counted in closed form for the Qwen2/Qwen3/Llama/
Mistral and CLIP/SigLIP vision layouts (checked against the transformers classes), and by instantiating
transformers' class on the ``meta`` device (no memory, no weights) for any other architecture; timm/open_clip
encoders are instantiated on the meta device too. The source used is reported for each component. Only
``prefix`` fusion (image tokens in the sequence, LLaVA) is modelled.

Accuracy: ``benchmarks/bench_memory_planner.py`` compares the planner with the peak RSS of real vlkit training
steps of the toy recipe on a CPU (fp32): within a few percent (see ``benchmarks/results/memory_planner.json``).
The GPU-specific parts (bf16 autocast, CUDA SDPA kernels, the caching allocator, ZeRO buffers) are modelled,
not measured.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlkit.config import Recipe, StageConfig

GB = 1e9
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2, "float": 4,
               "float64": 8}

# Published configs (config.json on the hub) of the models the shipped recipes name, for offline planning.
_QWEN25 = dict(model_type="qwen2", hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
               rope_theta=1000000.0, attention_dropout=0.0, torch_dtype="bfloat16")
_CLIP_L = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
               num_attention_heads=16, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
               projection_dim=768, torch_dtype="float32")
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-0.5B-Instruct": dict(_QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                       tie_word_embeddings=True),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(_QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                       tie_word_embeddings=True),
    "Qwen/Qwen2.5-3B-Instruct": dict(_QWEN25, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                     num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                                     tie_word_embeddings=True),
    "Qwen/Qwen2.5-7B-Instruct": dict(_QWEN25, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                     tie_word_embeddings=False),
    "openai/clip-vit-large-patch14-336": dict(_CLIP_L, image_size=336),
    "openai/clip-vit-large-patch14": dict(_CLIP_L, image_size=224),
    "google/siglip-so400m-patch14-384": dict(model_type="siglip_vision_model", hidden_size=1152,
                                             intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                             image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh",
                                             layer_norm_eps=1e-6, torch_dtype="float32"),
}
# the base (non-Instruct) Qwen2.5 models have the same shapes
for _name in [n for n in KNOWN_CONFIGS if n.endswith("-Instruct")]:
    KNOWN_CONFIGS[_name.removesuffix("-Instruct")] = KNOWN_CONFIGS[_name]


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


# ---- configs -------------------------------------------------------------------------------------------------------
# transformers' defaults for the keys used here (config.json files omit values equal to the class defaults)
CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False, hidden_act="silu"),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=128, tie_word_embeddings=False,
                  attention_bias=False, hidden_act="silu"),
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, tie_word_embeddings=False, attention_bias=False,
                  mlp_bias=False, hidden_act="silu"),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, hidden_act="silu"),
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu"),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                                hidden_act="gelu_pytorch_tanh", vision_use_head=True),
}


@dataclass
class LoadedConfig:
    data: dict[str, Any]
    source: str
    path: str | None = None  # a local dir or file, when there is one (AutoConfig can read it)


def _read_json(path: str | Path) -> dict[str, Any]:
    import json

    return json.loads(Path(path).read_text())


def _toy_path(spec: str) -> str | None:
    """A ``toy:`` reference resolved only when that needs no work (planning never builds the toy world)."""
    from vlkit.toyworld import toy_path_if_available

    return toy_path_if_available(spec)


def load_config(model: str, online: bool | None = None) -> LoadedConfig:
    """A model's ``config.json`` as a dict: local dir -> HF cache -> built-in table -> hub (when online)."""
    if isinstance(model, str) and model.startswith("toy:"):
        path = _toy_path(model)
        if path is None:
            from vlkit.toyworld import CLIP_ARCH, LM_ARCH

            arch = {"toy:clip": dict(model_type="clip_vision_model", hidden_act="quick_gelu", **CLIP_ARCH["vision"]),
                    "toy:lm": dict(model_type="qwen2", vocab_size=435, **LM_ARCH)}.get(model)
            if arch is None:
                raise ValueError(f"no config for '{model}'")
            return LoadedConfig(arch, "vlkit.toyworld architecture (toy world not built yet; vocab approximate)")
        model = path
    if os.path.isdir(model):
        cfg = Path(model) / "config.json"
        if not cfg.exists():
            raise FileNotFoundError(f"{model} has no config.json")
        return LoadedConfig(_read_json(cfg), f"local {cfg}", model)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
        if isinstance(cached, str):
            return LoadedConfig(_read_json(cached), "HF cache config.json", str(Path(cached).parent))
    except Exception:  # noqa: BLE001 - not a repo id, no cache
        pass
    if model in KNOWN_CONFIGS:
        return LoadedConfig(dict(KNOWN_CONFIGS[model]), "built-in table (published config.json)")
    if online is None:
        online = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("0", "", "false", "no")
    if not online:
        raise ValueError(f"config of '{model}' is not a local dir, not in the HF cache and not in the built-in table "
                         f"({', '.join(sorted(KNOWN_CONFIGS))}); cannot fetch it offline")
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(model, "config.json")
    return LoadedConfig(_read_json(path), "hub config.json", str(Path(path).parent))


def _sub(cfg: dict[str, Any], key: str, model_type: str) -> dict[str, Any]:
    """A full CLIPModel/SiglipModel (or VLM) config's sub-config, with its model_type."""
    sub = cfg.get(key)
    if isinstance(sub, dict):
        return {"model_type": sub.get("model_type", model_type), **sub}
    return cfg


def _with_type_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    return {**CONFIG_DEFAULTS.get(cfg.get("model_type", ""), {}), **cfg}


def _dtype_bytes(value: Any, default: int = 4) -> int:
    if value is None:
        return default
    return DTYPE_BYTES.get(str(value).replace("torch.", ""), default)


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
    from vlkit.registry import LLMS

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
    from vlkit.components.encoders import resolve_layer

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
    from vlkit.components.encoders import resolve_layer

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
    from vlkit.registry import ENCODERS

    comp = recipe.encoder
    params = _with_defaults(ENCODERS, comp.name, comp.params())
    layer, frozen = int(params.get("layer", -1)), bool(params.get("frozen", True))
    model = str(params.get("model"))
    if comp.name in ("hf_clip", "hf_siglip"):
        return _hf_vision_spec(comp.name, model, layer, frozen, online)
    if comp.name in ("timm_vit", "timm_convnext"):
        import timm

        kwargs: dict[str, Any] = {"num_classes": 0}
        if comp.name == "timm_vit" and params.get("image_size"):
            kwargs["img_size"] = int(params["image_size"])
        with torch.device("meta"):
            net = timm.create_model(model, pretrained=False, **kwargs)
        if comp.name == "timm_vit":
            grid = tuple(int(g) for g in net.patch_embed.grid_size)
            size = int(net.patch_embed.img_size[0])
            return _module_vision_spec(comp.name, model, net, list(net.blocks), layer, frozen, int(net.embed_dim),
                                       size, grid, int(getattr(net, "num_prefix_tokens", 1)),
                                       "timm model definition (meta device)")
        size = int(params.get("image_size") or net.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
        stages = list(net.stages)
        idx = layer % len(stages)
        reduction = 4 * 2 ** idx
        dim = int(net.feature_info[idx]["num_chs"]) if hasattr(net, "feature_info") else int(net.num_features)
        spec = _module_vision_spec(comp.name, model, net, stages, layer, frozen, dim, size,
                                   (size // reduction, size // reduction), 0, "timm model definition (meta device)")
        spec.notes.append("ConvNeXt stage activations use the ViT-block formula (rough)")
        return spec
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
    # a plugin encoder: build it on the meta device when its factory allows, else unknown
    try:
        with torch.device("meta"), _offline():
            enc = ENCODERS.create(comp.name, **comp.params())
        grid = tuple(enc.grid) if getattr(enc, "grid", None) else (1, 1)
        blocks = enc.blocks() if hasattr(enc, "blocks") else []
        n = grid[0] * grid[1]
        return EncoderSpec(
            name=comp.name, kind=comp.name, source="plugin factory on the meta device", dtype_bytes=4,
            params=_nparams(enc), hidden=int(enc.embed_dim), intermediate=4 * int(enc.embed_dim),
            depth=len(blocks), used_blocks=len(blocks), tokens=n + (1 if getattr(enc, "has_cls", False) else 0),
            patches=n, has_cls=bool(getattr(enc, "has_cls", False)), grid=grid,
            block_params=_nparams(blocks[0]) if blocks else 0, unused_params=0, keeps_all_hidden=False,
            act_saves=2, frozen=frozen, notes=["plugin encoder: activations use the ViT-block formula"])
    except Exception as exc:  # noqa: BLE001 - unknown plugin
        return EncoderSpec(
            name=comp.name, kind=comp.name, source=f"unknown ({type(exc).__name__}: {exc})"[:160], dtype_bytes=4,
            params=0, hidden=int(params.get("embed_dim", 0) or 0), intermediate=0, depth=0, used_blocks=0, tokens=1,
            patches=1, has_cls=False, grid=(1, 1), block_params=0, unused_params=0, keeps_all_hidden=False,
            act_saves=2, frozen=frozen, notes=[f"encoder '{comp.name}' could not be described: not estimated"])


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
    from vlkit.model import _resolved_params
    from vlkit.registry import PROJECTORS, TOKEN_STRATEGIES
    from vlkit.types import EncoderOutput

    notes: list[str] = []
    d, out_dim = max(enc.hidden, 1), max(llm_hidden, 1)
    tok_params = {"num_tokens": None, **_resolved_params(recipe.tokens.params())}
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


# ---- the plan ----------------------------------------------------------------------------------------------------
@dataclass
class Row:
    component: str
    params: int = 0
    trainable: int = 0
    weights: float = 0.0  # bytes per GPU
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


@dataclass
class StagePlan:
    stage: str
    micro_batch: int  # samples per GPU per forward/backward
    global_micro_batch: int
    seq_len: int
    image_tokens: int
    supervised_tokens: int
    gpus: int
    zero: int
    compute_bytes: int
    llm_mode: str
    gradient_checkpointing: bool
    rows: list[Row]
    peak_phase: str
    activation_terms: dict[str, float]
    gpu_memory_gb: float
    total: float = 0.0
    notes: list[str] = field(default_factory=list)
    suggestions: list[tuple[str, float]] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory_gb * GB

    def verdict(self) -> str:
        used, cap = self.total / GB, self.gpu_memory_gb
        if self.fits:
            return f"fits in {cap:g} GB ({used:.1f} GB per GPU, {cap - used:.1f} GB headroom)"
        tries = "; ".join(f"{what} -> {gb / GB:.1f} GB" for what, gb in self.suggestions) or \
            "gradient_checkpointing / zero 3 / smaller batch"
        return f"does not fit: {used - cap:.1f} GB over {cap:g} GB ({used:.1f} GB per GPU); try {tries}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rows"] = [{**asdict(r), "total": r.total} for r in self.rows]
        d["fits"] = self.fits
        d["verdict"] = self.verdict()
        return d


@dataclass
class Plan:
    recipe: str
    llm: LLMSpec
    encoder: EncoderSpec
    vision: VisionSpec
    stages: list[StagePlan]
    device: str

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "device": self.device, "llm": asdict(self.llm),
                "encoder": asdict(self.encoder), "vision": asdict(self.vision),
                "stages": [s.to_dict() for s in self.stages]}


def compute_bytes(recipe: Recipe, device: str) -> int:
    """Bytes per element of matmul activations: autocast (bf16/fp16) on a GPU, fp32 otherwise (as vlkit.train)."""
    if device != "cuda" or recipe.train.precision == "fp32":
        return 4
    return 2


def _lora_linears(llm: LLMSpec, target: list[str] | str) -> list[tuple[str, int, int]]:
    if target == "all-linear":
        return list(llm.layer_linears)
    if isinstance(target, str):
        return [lin for lin in llm.layer_linears if re.fullmatch(target, lin[0])]
    return [lin for lin in llm.layer_linears
            if any(lin[0] == t or lin[0].endswith("." + t) for t in target)]


def _group(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if re.search(r"q_proj|k_proj|v_proj|qkv|query|key|value|c_attn", leaf):
        return "attn_in"
    if re.search(r"o_proj|out_proj|dense$|c_proj", leaf) and "mlp" not in name:
        return "attn_out"
    if re.search(r"gate|up_proj|fc1|w1|w3|c_fc", leaf):
        return "mlp_in"
    return f"other:{name}"


def llm_layer_terms(llm: LLMSpec, mode: str, a: int, seq_len: int, padding_mask: bool, stage: StageConfig,
                    device: str) -> dict[str, float]:
    """Bytes per token saved for backward by one decoder layer (see the module docstring)."""
    h, w = llm.hidden, llm.dtype_bytes
    q_dim = llm.heads * llm.head_dim
    kv_dim = llm.kv_heads * llm.head_dim
    kv_eff = q_dim if padding_mask and llm.kv_heads != llm.heads else kv_dim  # repeat_kv when a mask is given
    inter = llm.intermediate
    terms: dict[str, float] = {
        "norm_inputs_fp32": 2 * 4 * h,
        "attention_qkvo": a * (2 * q_dim + 2 * kv_eff) + 4 * llm.heads,
        "attention_mask_bias": a * seq_len if padding_mask else 0,
        "mlp": a * inter * (3 if llm.gated_mlp else 1),
    }
    if mode == "full":
        terms["full_norm_outputs"] = 2 * (w * h + a * h)
        terms["full_down_input"] = a * inter
    elif mode == "lora":
        lin = _lora_linears(llm, stage.lora.target_modules)
        r = stage.lora.r
        mask = 1 if device == "cuda" else w
        if stage.lora.dropout > 0:
            terms["lora_inputs"] = sum((a + mask) * d_in for _, d_in, _ in lin)
        elif w == a:
            groups: dict[str, int] = {}
            for name, d_in, _ in lin:
                g = _group(name)
                if g != "attn_out":
                    groups[g] = d_in
            terms["lora_inputs"] = a * sum(groups.values())
        else:
            terms["lora_inputs"] = sum(a * d_in for _, d_in, _ in lin)
        terms["lora_rank"] = len(lin) * a * r
    return terms


def _enc_block_bytes(enc: EncoderSpec, a: int) -> float:
    """Bytes per token kept by one trainable ViT block."""
    r = 4 if a < 4 else enc.dtype_bytes  # LayerNorm inputs: upcast to fp32 under autocast
    return 2 * r * enc.hidden + 6 * a * enc.hidden + enc.act_saves * a * enc.intermediate


def recipe_zero(recipe: Recipe) -> int:
    """The ZeRO stage the recipe's launch settings imply: ``train.deepspeed`` (dict or JSON path) zero stage,
    ``train.distributed: fsdp`` as 3 (full sharding), else 0."""
    import json

    dist = getattr(recipe.train, "distributed", "auto")
    ds = getattr(recipe.train, "deepspeed", None)
    if dist == "fsdp":
        return 3
    if isinstance(ds, str):
        try:
            ds = json.loads(Path(ds).read_text())
        except (OSError, ValueError):
            return 0
    if isinstance(ds, dict) and dist in ("auto", "deepspeed"):
        zo = ds.get("zero_optimization")
        stage = ds.get("zero_stage", zo.get("stage") if isinstance(zo, dict) else None)
        return int(stage) if stage in (0, 1, 2, 3) else 0
    return 0


def plan_stage(recipe: Recipe, stage_name: str, llm: LLMSpec, enc: EncoderSpec, vision: VisionSpec, *,
               gpus: int = 1, zero: int | None = None, gpu_memory_gb: float = 80.0, seq_len: int | None = None,
               supervised_frac: float = 0.3, micro_batch: int | None = None, device: str = "cuda",
               overhead_gb: float | None = None, padding_mask: bool = True, images_per_sample: float = 1.0,
               gradient_checkpointing: bool | None = None, _suggest: bool = True) -> StagePlan:
    if zero is None:
        zero = recipe_zero(recipe)
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"--zero must be 0, 1, 2 or 3, got {zero}")
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if not 0 < supervised_frac <= 1:
        raise ValueError(f"--supervised-frac must be in (0, 1], got {supervised_frac}")
    if stage_name not in recipe.stages:
        from vlkit.registry import suggest

        raise ValueError(f"stage '{stage_name}' is not defined.{suggest(stage_name, recipe.stages)} "
                         f"Defined: {', '.join(recipe.stages)}")
    st = recipe.stages[stage_name]
    gc = st.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    # vlkit's micro-batch (batch_size / grad_accum) is global: under DDP/ZeRO/FSDP each rank takes every gpus-th
    # sample of it (vlkit.distributed.shard_batch), so a GPU holds ceil(micro / gpus) samples
    global_micro = max(1, st.batch_size // st.grad_accum)
    B = micro_batch or math.ceil(global_micro / gpus)
    T = int(seq_len or recipe.data.max_length)
    a = compute_bytes(recipe, device)
    M = vision.image_tokens
    n_img = images_per_sample * B
    S = int(round(supervised_frac * B * max(T - 1, 1)))
    notes: list[str] = []
    if M * images_per_sample > T:
        notes.append(f"{M} image tokens per sample exceed the sequence length {T}")
    if seq_len is None:
        notes.append(f"every sample is taken as padded to data.max_length={T} (an upper bound); pass --seq-len "
                     "with a typical padded batch length for a closer estimate")
    if recipe.fusion.name != "prefix":
        notes.append(f"fusion '{recipe.fusion.name}' is not modelled: only prefix fusion (image tokens in the "
                     "sequence) is; its own parameters and activations are not counted")

    # ---- parameters: what trains -------------------------------------------------------------------------------
    lora_params = 0
    if st.llm == "lora":
        lora_params = llm.layers * sum(st.lora.r * (i + o) for _, i, o in _lora_linears(llm, st.lora.target_modules))
    llm_trainable = llm.params if st.llm == "full" else 0
    enc_trainable = 0
    if not enc.frozen:
        enc_trainable = enc.params - enc.unused_params
    elif st.unfreeze_encoder_blocks:
        if st.unfreeze_encoder_blocks > enc.used_blocks and enc.used_blocks:
            raise ValueError(f"unfreeze_encoder_blocks={st.unfreeze_encoder_blocks} but the encoder has "
                             f"{enc.used_blocks} blocks up to the selected layer")
        enc_trainable = st.unfreeze_encoder_blocks * enc.block_params
    enc_train_blocks = enc.used_blocks if not enc.frozen else st.unfreeze_encoder_blocks
    proj_trainable = vision.projector_params if st.train_projector else 0

    w_shard = gpus if zero >= 3 else 1
    g_shard = gpus if zero >= 2 else 1
    o_shard = gpus if zero >= 1 else 1

    def param_row(name: str, total: int, trainable: int, dtype_bytes: int) -> Row:
        grad_b = dtype_bytes
        opt_b = 8 + (4 if dtype_bytes < 4 else 0)  # two fp32 moments (+ fp32 master copy of 16-bit weights)
        return Row(name, total, trainable, weights=total * dtype_bytes / w_shard,
                   grads=trainable * grad_b / g_shard, optimizer=trainable * opt_b / o_shard)

    enc_row = param_row(f"encoder ({enc.kind})", enc.params, enc_trainable, enc.dtype_bytes)
    proj_row = param_row(f"projector ({recipe.projector.name}, {recipe.tokens.name} tokens)",
                         vision.projector_params + vision.tokens_params, proj_trainable, 4)
    llm_row = param_row(f"llm ({st.llm})", llm.params, llm_trainable, llm.dtype_bytes)
    rows = [enc_row, proj_row, llm_row]
    lora_row = None
    if st.llm == "lora":
        targets = st.lora.target_modules
        targets = targets if isinstance(targets, str) else ",".join(targets)
        lora_row = param_row(f"  lora r={st.lora.r} ({targets})", lora_params, lora_params, 4)
        rows.append(lora_row)
    if zero == 0 and gpus > 1:
        for r in rows:
            r.grads *= 2
        notes.append("DDP (ZeRO-0) keeps a second copy of the gradients in its all-reduce buckets (counted)")
    head_row = Row(f"lm head logits ({supervised_frac:.0%} supervised)")
    rows.append(head_row)

    # ---- activations -----------------------------------------------------------------------------------------
    tokens = B * T
    mode = st.llm if st.llm in ("lora", "full") else "input"
    per_layer = llm_layer_terms(llm, mode, a, T, padding_mask, st, device)
    layer_bytes = sum(per_layer.values()) * tokens
    resid = llm.dtype_bytes
    if gc:
        stored_layers = llm.layers * resid * llm.hidden * tokens
        recompute = layer_bytes
    else:
        stored_layers = llm.layers * layer_bytes
        recompute = 0.0
    misc = tokens * (4 * llm.hidden + 2 * 4 * llm.head_dim + (T if padding_mask else 0))  # final norm, rope, bool mask
    if st.llm == "full":
        misc += S * a * llm.hidden
    # gradient buffers in flight while the last layer runs backward, net of the saved tensors they replace: about
    # one MLP-intermediate-size and two hidden-size gradients per token
    backward_ws = tokens * a * (llm.intermediate + 2 * llm.hidden)
    head = 12 * S * llm.vocab  # fp32 log-probs + grad + grad input at the supervised positions
    proj_act = vision.projector_saved_bytes_fp32 * n_img * (a / 4) if st.train_projector or enc_trainable else 0.0
    patches_keep = n_img * enc.tokens * enc.hidden * enc.dtype_bytes  # the selected hidden state, projector input
    enc_stored = enc_train_blocks * _enc_block_bytes(enc, a) * n_img * enc.tokens
    n_hidden = (enc.depth + 1) if enc.keeps_all_hidden else 2
    enc_work = n_img * enc.tokens * (4 * a * enc.hidden + 2 * a * enc.intermediate)
    enc_forward = n_hidden * n_img * enc.tokens * enc.hidden * enc.dtype_bytes + enc_work + enc_stored

    llm_phase = {
        "encoder": enc_stored + patches_keep,
        "projector": proj_act,
        "llm": stored_layers + recompute + misc + backward_ws,
        "head": head,
    }
    trainable_all = enc_trainable + proj_trainable + llm_trainable + lora_params
    opt_step = trainable_all * 4 / o_shard  # foreach AdamW temporaries (after the backward pass)
    grads = sum(r.grads for r in rows)
    # Gradients outlive the activations when they accumulate over micro-batches, or when DDP/ZeRO keep gradient
    # buffers; otherwise (one process, grad_accum 1, zero_grad(set_to_none=True)) they are created during the
    # backward pass as the activations are freed, so they do not stack on the activation peak.
    persistent = st.grad_accum > 1 or gpus > 1 or zero > 0
    on_top = grads if persistent else 0.0
    phase_totals = {"llm backward": sum(llm_phase.values()) + on_top, "encoder forward": enc_forward + on_top,
                    "optimizer step": grads + opt_step}
    peak_phase = max(phase_totals, key=phase_totals.get)
    if peak_phase == "llm backward":
        enc_row.activations = llm_phase["encoder"]
        proj_row.activations = llm_phase["projector"]
        llm_row.activations = llm_phase["llm"]
        head_row.activations = llm_phase["head"]
    elif peak_phase == "encoder forward":
        enc_row.activations = enc_forward
    else:
        llm_row.activations = opt_step
        notes.append("the optimizer step (gradients + AdamW temporaries) is the peak, not the activations")
    if peak_phase != "optimizer step" and not persistent and grads:
        for r in rows:
            r.grads = 0.0
        notes.append(f"gradients ({grads / GB:.2f} GB) are created during the backward pass as activations are "
                     "freed (grad_accum 1, one GPU): not part of the peak")
    act_terms = {f"per_layer.{k}": v * tokens for k, v in per_layer.items()}
    act_terms.update({"layers_stored": stored_layers, "recompute_layer": recompute, "llm_misc": misc,
                      "backward_workspace": backward_ws, "head": head, "projector": proj_act,
                      "encoder_stored": enc_stored, "encoder_patches": patches_keep, "encoder_forward": enc_forward,
                      "optimizer_step": opt_step})

    if zero == 3 and gpus > 1:
        largest = max(llm.embed_params, llm.layer_params, enc.block_params) * llm.dtype_bytes
        rows.append(Row("zero-3 gathered params (largest module + 1 prefetched layer)",
                        weights=largest + llm.layer_params * llm.dtype_bytes))
    if overhead_gb is None:
        overhead_gb = 1.0 if device == "cuda" else 0.0
    if overhead_gb:
        rows.append(Row("runtime (CUDA context, workspaces, allocator)", weights=overhead_gb * GB))
    sp = StagePlan(stage=stage_name, micro_batch=B, global_micro_batch=global_micro, seq_len=T, image_tokens=M,
                   supervised_tokens=S, gpus=gpus,
                   zero=zero, compute_bytes=a, llm_mode=st.llm, gradient_checkpointing=gc, rows=rows,
                   peak_phase=peak_phase, activation_terms=act_terms, gpu_memory_gb=gpu_memory_gb, notes=notes)
    sp.total = sum(r.total for r in rows)
    if _suggest and not sp.fits:
        kw = dict(gpus=gpus, zero=zero, gpu_memory_gb=gpu_memory_gb, seq_len=seq_len, supervised_frac=supervised_frac,
                  micro_batch=micro_batch, device=device, overhead_gb=overhead_gb, padding_mask=padding_mask,
                  images_per_sample=images_per_sample, gradient_checkpointing=gc, _suggest=False)
        if not gc:
            alt = plan_stage(recipe, stage_name, llm, enc, vision, **{**kw, "gradient_checkpointing": True})
            sp.suggestions.append((f"stages.{stage_name}.gradient_checkpointing=true", alt.total))
        if zero < 3 and gpus > 1:
            alt = plan_stage(recipe, stage_name, llm, enc, vision, **{**kw, "zero": 3})
            sp.suggestions.append(("--zero 3", alt.total))
        if B > 1:
            half = max(1, B // 2)
            alt = plan_stage(recipe, stage_name, llm, enc, vision, **{**kw, "micro_batch": half})
            sp.suggestions.append((f"smaller batch: micro-batch {half} per GPU "
                                   f"(stages.{stage_name}.grad_accum={st.grad_accum * 2})", alt.total))
    return sp


def plan(recipe: Recipe, stages: list[str] | None = None, *, online: bool | None = None, **kwargs: Any) -> Plan:
    """Plan every stage of ``recipe.train.stages`` (or the given ones). ``kwargs`` go to :func:`plan_stage`."""
    device = kwargs.get("device", "cuda")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"--device must be cuda or cpu, got '{device}'")
    llm = describe_llm(recipe, online)
    enc = describe_encoder(recipe, online)
    vision = describe_vision(recipe, enc, llm.hidden)
    names = stages or list(recipe.train.stages)
    return Plan(recipe=recipe.name, llm=llm, encoder=enc, vision=vision, device=device,
                stages=[plan_stage(recipe, s, llm, enc, vision, **kwargs) for s in names])


# ---- printing ----------------------------------------------------------------------------------------------------
def _gb(x: float) -> str:
    return "-" if not x else (f"{x / GB:.2f}" if x >= 0.01 * GB else f"{x / GB:.3f}")


def _count(n: int) -> str:
    if not n:
        return "-"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def print_plan(console: Any, p: Plan) -> None:
    from rich.table import Table

    console.print(f"[bold]{p.recipe}[/]: llm {p.llm.name} ({_count(p.llm.params)} params, {p.llm.layers} layers, "
                  f"hidden {p.llm.hidden}, vocab {p.llm.vocab}) from {p.llm.source}")
    console.print(f"  encoder {p.encoder.name} ({_count(p.encoder.params)} params, {p.encoder.depth} blocks, "
                  f"{p.encoder.tokens} tokens/image) from {p.encoder.source}")
    console.print(f"  {p.vision.image_tokens} image tokens per image; projector {_count(p.vision.projector_params)} "
                  "params")
    for note in p.llm.notes + p.encoder.notes + p.vision.notes:
        console.print(f"  [yellow]note[/]: {note}")
    for s in p.stages:
        prec = {2: "bf16/fp16 autocast", 4: "fp32"}[s.compute_bytes]
        per_gpu = f" per GPU (global {s.global_micro_batch})" if s.gpus > 1 else ""
        title = (f"stage {s.stage}: llm={s.llm_mode}, micro-batch {s.micro_batch}{per_gpu} x {s.seq_len} tokens "
                 f"({s.image_tokens} image), {prec}, "
                 f"gradient_checkpointing={'on' if s.gradient_checkpointing else 'off'}, "
                 f"{s.gpus} GPU(s), ZeRO-{s.zero}")
        table = Table(title=title, title_justify="left")
        table.add_column("component")
        for col in ("params", "trainable", "weights GB", "grads GB", "optim GB", "activ. GB", "total GB"):
            table.add_column(col, justify="right")
        for r in s.rows:
            table.add_row(r.component, _count(r.params), _count(r.trainable), _gb(r.weights), _gb(r.grads),
                          _gb(r.optimizer), _gb(r.activations), _gb(r.total))
        tot = Row("total per GPU", weights=sum(r.weights for r in s.rows), grads=sum(r.grads for r in s.rows),
                  optimizer=sum(r.optimizer for r in s.rows), activations=sum(r.activations for r in s.rows))
        table.add_row("[bold]total per GPU", "", "", _gb(tot.weights), _gb(tot.grads), _gb(tot.optimizer),
                      _gb(tot.activations), f"[bold]{_gb(tot.total)}")
        console.print(table)
        console.print(f"  peak: {s.peak_phase}; {s.supervised_tokens:,} supervised tokens reach the LM head")
        for note in s.notes:
            console.print(f"  [yellow]note[/]: {note}")
        style = "bold green" if s.fits else "bold red"
        console.print(f"  [{style}]{s.verdict()}[/]", highlight=False)
