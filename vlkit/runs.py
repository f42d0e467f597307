"""Loading a trained run: rebuild the model from a run directory's recipe and load its stage checkpoints.

One implementation for everything that reads a run back (``predict``, ``eval``, ``export``, the lmms-eval
adapter); it sits below them and imports none of them. Also home to the two steps training and loading share:
choosing the device and attaching a stage's LoRA adapters.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model

from vlkit.checkpoint import find_checkpoint, load_trainable
from vlkit.config import Recipe, StageConfig, load_recipe
from vlkit.model import VLM, build_model


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def attach_lora(model: VLM, stage: StageConfig) -> None:
    """Wrap the LLM in peft LoRA adapters as ``stage.lora`` says (once: a model that has them is left as is)."""
    if hasattr(model.llm.model, "peft_config"):
        return
    cfg = LoraConfig(r=stage.lora.r, lora_alpha=stage.lora.alpha, lora_dropout=stage.lora.dropout,
                     target_modules=stage.lora.target_modules, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` property: a FutureWarning about
        # peft's code, printed on every instruct stage, that a vlkit user can do nothing about
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model.llm.model = get_peft_model(model.llm.model, cfg)


@dataclass
class LoadedRun:
    """A run's model (on the CPU, in eval mode) and what loading it used."""

    model: VLM
    recipe: Recipe
    used: dict[str, str]  # stage -> "final" or "last": the checkpoint each stage's weights came from
    lora_stage: str | None  # the first stage that trains LoRA adapters (None: no adapters)
    touched: set[int]  # ids of the parameters the checkpoints wrote


def load_run_tracked(run_dir: Path) -> LoadedRun:
    """Rebuild the model from ``run_dir/config.yaml`` and load every stage's checkpoint (``final``, else the
    ``last`` of an unfinished stage) in the recipe's stage order; LoRA is attached as each stage did."""
    run_dir = Path(run_dir)
    cfg = run_dir / "config.yaml"
    if not cfg.exists():
        raise FileNotFoundError(f"{run_dir} is not a vlkit run directory (no config.yaml)")
    recipe = load_recipe(cfg)
    model = build_model(recipe)
    used: dict[str, str] = {}
    lora_stage: str | None = None
    touched: set[int] = set()
    for stage_name in recipe.train.stages:
        stage = recipe.stages[stage_name]
        ckpt = find_checkpoint(run_dir / "checkpoints" / stage_name / "final") or \
            find_checkpoint(run_dir / "checkpoints" / stage_name / "last")
        if ckpt is None:
            continue
        if stage.llm == "lora":
            if lora_stage is None:
                lora_stage = stage_name
            attach_lora(model, stage)
        names = set(load_trainable(model, ckpt / "trainable.safetensors"))
        touched |= {id(p) for n, p in model.named_parameters() if n in names}
        used[stage_name] = "final" if "final" in ckpt.name else "last"
    if not used:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet (checkpoints/<stage>/final or last)")
    return LoadedRun(model.cpu().eval(), recipe, used, lora_stage, touched)


def load_run(run_dir: str | Path) -> tuple[VLM, Any, torch.device]:
    """The model of a run: the recipe in ``config.yaml`` plus every finished stage's trained weights, on the
    recipe's device, in eval mode."""
    loaded = load_run_tracked(Path(run_dir))
    device = pick_device(loaded.recipe.train.device)
    return loaded.model.to(device).eval(), loaded.recipe, device
