"""The embedded default: a procedural shapes world with a toy tokenizer, toy-clip and toy-lm.

The three models are pretrained once by ``vlkit toy pretrain`` (``pretrain.py``, from a fixed seed) and shipped
in ``vlkit/toyworld/weights`` with a manifest of sha256 hashes, the full pretraining config and its quality
report (``shipped.py``). A user's first run only generates the shapes data (``vlkit.data.toy``: scenes,
questions, images) into a cache directory named by the config hash and loads the checked weights (``world.py``).
``probes.py`` measures the models; ``models.py`` holds the two training loops; ``tokenizer.py`` the ChatML tokenizer.
"""
from vlkit.toyworld.models import CLIP_MEAN, CLIP_STD, normalize
from vlkit.toyworld.pretraining import (CLIP_ARCH, LM_ARCH, PRESETS, pretrain, pretrain_config,
                                     shipped_config_hash)
from vlkit.toyworld.shipped import PACKAGE_WEIGHTS, ToyWeightsError, verify
from vlkit.toyworld.tokenizer import CHAT_TEMPLATE, DEFAULT_SYSTEM, SPECIAL_TOKENS, build_tokenizer
from vlkit.toyworld.world import (ENV_DIR, ENV_PRESET, ToyWorld, build_toy_world, ensure_toy_world, env_preset,
                                  is_built, resolve_toy, toy_cache_dir, toy_path_if_available, toy_world_of,
                                  world_id)

__all__ = [
    "CHAT_TEMPLATE", "CLIP_ARCH", "CLIP_MEAN", "CLIP_STD", "DEFAULT_SYSTEM", "ENV_DIR", "ENV_PRESET", "LM_ARCH",
    "PACKAGE_WEIGHTS", "PRESETS", "SPECIAL_TOKENS", "ToyWeightsError", "ToyWorld", "build_tokenizer",
    "build_toy_world", "ensure_toy_world", "env_preset", "is_built", "normalize", "pretrain", "pretrain_config",
    "resolve_toy", "shipped_config_hash", "toy_cache_dir", "toy_path_if_available", "toy_world_of", "verify",
    "world_id",
]
