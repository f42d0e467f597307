"""Load a trained run directory and answer questions with it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlkit.data.llava import ImageTransform
from vlkit.evaluate import generate_answers
from vlkit.model import VLM
from vlkit.train import pick_device


def load_run(run_dir: str | Path) -> tuple[VLM, Any, torch.device]:
    """The model of a run: the recipe in ``config.yaml`` plus every finished stage's trained weights."""
    from vlkit.export import _load_run_tracked  # one implementation of "rebuild + load stage checkpoints"

    model, recipe, *_ = _load_run_tracked(Path(run_dir))
    device = pick_device(recipe.train.device)
    return model.to(device).eval(), recipe, device


def predict_records(model: VLM, records: list[dict[str, Any]], image_root, device: torch.device,
                    **gen: Any) -> list[str]:
    t = ImageTransform(model.encoder.image_size, model.encoder.mean, model.encoder.std)
    max_new = gen.pop("max_new_tokens", 32)
    return generate_answers(model, records, image_root, t, device, max_new_tokens=max_new, **gen)
