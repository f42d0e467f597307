"""Load a trained run directory and answer questions with it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlkit.checkpoint import find_checkpoint, load_trainable
from vlkit.config import load_recipe
from vlkit.data.llava import ImageTransform
from vlkit.evaluate import generate_answers
from vlkit.model import VLM, build_model
from vlkit.train import attach_lora, pick_device


def load_run(run_dir: str | Path) -> tuple[VLM, Any, torch.device]:
    """The model of a run: the recipe in ``config.yaml`` plus every finished stage's trained weights."""
    run_dir = Path(run_dir)
    cfg = run_dir / "config.yaml"
    if not cfg.exists():
        raise FileNotFoundError(f"{run_dir} is not a vlkit run directory (no config.yaml)")
    recipe = load_recipe(cfg)
    device = pick_device(recipe.train.device)
    model = build_model(recipe)
    loaded = []
    for stage_name in recipe.train.stages:
        stage = recipe.stages[stage_name]
        ckpt = find_checkpoint(run_dir / "checkpoints" / stage_name / "final") or \
            find_checkpoint(run_dir / "checkpoints" / stage_name / "last")
        if ckpt is None:
            continue
        if stage.llm == "lora":
            attach_lora(model, stage)
        load_trainable(model, ckpt / "trainable.safetensors")
        loaded.append(f"{stage_name}:{ckpt.name}")
    if not loaded:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet (checkpoints/<stage>/final or last)")
    return model.to(device).eval(), recipe, device


def predict_records(model: VLM, records: list[dict[str, Any]], image_root, device: torch.device,
                    **gen: Any) -> list[str]:
    t = ImageTransform(model.encoder.image_size, model.encoder.mean, model.encoder.std)
    max_new = gen.pop("max_new_tokens", 32)
    return generate_answers(model, records, image_root, t, device, max_new_tokens=max_new, **gen)
