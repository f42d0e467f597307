"""The published ``config.json`` of the models vlkit's recipes name, and where a model's config is read from
(local dir, HF cache, this built-in table, or the hub when online). Data and plain functions only: the planner
(``vlkit.plan``) and ``random_init`` both read configs through here."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass
class LoadedConfig:
    data: dict[str, Any]
    source: str
    path: str | None = None  # a local dir or file, when there is one (AutoConfig can read it)


def _read_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _read_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def load_config(model: str, online: bool | None = None) -> LoadedConfig:
    """A model's ``config.json`` as a dict: local dir -> HF cache -> built-in table -> hub (when online)."""
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


