"""Where the planner's architecture facts come from: a model's ``config.json`` (local dir, ``toy:`` path, HF cache,
the built-in table of published configs, or the hub when online), with transformers' defaults for omitted keys.
huggingface_hub is imported only where a config is looked up in its cache or fetched."""
from __future__ import annotations

from typing import Any

from vlkit.published_configs import KNOWN_CONFIGS, LoadedConfig
from vlkit.published_configs import load_config as load_published_config
from vlkit.toyworld import CLIP_ARCH, LM_ARCH, toy_path_if_available

GB = 1e9
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2, "float": 4,
               "float64": 8}

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


def _toy_path(spec: str) -> str | None:
    """A ``toy:`` reference resolved only when that needs no work (planning never builds the toy world)."""
    return toy_path_if_available(spec)


def load_config(model: str, online: bool | None = None) -> LoadedConfig:
    """A model's ``config.json`` as a dict: ``toy:`` path (or the toy architecture before the world is built) ->
    ``vlkit.published_configs.load_config`` (local dir -> HF cache -> built-in table -> hub when online)."""
    if isinstance(model, str) and model.startswith("toy:"):
        path = _toy_path(model)
        if path is None:
            arch = {"toy:clip": dict(model_type="clip_vision_model", hidden_act="quick_gelu", **CLIP_ARCH["vision"]),
                    "toy:lm": dict(model_type="qwen2", vocab_size=435, **LM_ARCH)}.get(model)
            if arch is None:
                raise ValueError(f"no config for '{model}'")
            return LoadedConfig(arch, "vlkit.toyworld architecture (toy world not built yet; vocab approximate)")
        model = path
    return load_published_config(model, online)


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
