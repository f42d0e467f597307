"""vlkit: build and compare LLaVA-style vision-language models."""
from vlkit.config import ConfigError, Recipe, load_recipe
from vlkit.registry import (
    create_encoder,
    create_llm,
    create_projector,
    create_token_strategy,
    list_encoders,
    list_llms,
    list_projectors,
    list_token_strategies,
    register_encoder,
    register_llm,
    register_projector,
    register_token_strategy,
)
from vlkit.types import EncoderOutput

from vlkit._numerics import warm_up_vml  # noqa: E402

warm_up_vml()  # before any model runs: a process's first vector-math call can round differently (vlkit/_numerics.py)

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "EncoderOutput", "Recipe", "load_recipe", "create_encoder", "create_llm", "create_projector",
    "create_token_strategy", "list_encoders", "list_llms", "list_projectors", "list_token_strategies",
    "register_encoder", "register_llm", "register_projector", "register_token_strategy", "__version__",
]
