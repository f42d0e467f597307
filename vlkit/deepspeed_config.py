"""What vlkit cannot accept in a DeepSpeed config (``train.deepspeed``): plain dict checks, without torch, so that
the recipe (vlkit/config.py) validates it when it loads and vlkit/distributed/deepspeed_zero.py again when it runs."""
from __future__ import annotations

from typing import Any


def deepspeed_config_problems(cfg: dict[str, Any]) -> list[str]:
    """What vlkit cannot accept in a DeepSpeed config (also used by recipe validation)."""
    out = []
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            out.append(f"remove the '{key}' section: vlkit builds AdamW with the stage's per-module learning rates "
                       "and steps the stage's learning-rate schedule itself")
    stage = cfg.get("zero_stage", cfg.get("zero_optimization", {}).get("stage") if isinstance(
        cfg.get("zero_optimization"), dict) else None)
    if stage is not None and stage not in (0, 1, 2, 3):
        out.append(f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    if "zero_stage" in cfg and isinstance(cfg.get("zero_optimization"), dict) \
            and "stage" in cfg["zero_optimization"] and cfg["zero_optimization"]["stage"] != cfg["zero_stage"]:
        out.append("zero_stage and zero_optimization.stage disagree")
    return out
