"""A stage's evaluation: validation loss, generation accuracy per question type and BLEU (vlkit/evaluate.py), during
a stage (``eval_every``), when it ends, and on an unsharded copy after FSDP / ZeRO-3."""
from __future__ import annotations

from typing import Any

import torch

from vlkit.config import Recipe, StageConfig
from vlkit.data.llava import ImageTransform, load_records
from vlkit.evaluate import evaluate, predictions_path, write_predictions
from vlkit.model import VLM, resolve_ref


def run_eval(model: VLM, recipe: Recipe, stage: StageConfig, records: list[dict[str, Any]],
             transform: ImageTransform, device: torch.device, features_fn: Any) -> dict[str, Any]:
    """The stage's evaluation on ``records`` (its ``eval_data``, cut to ``eval_max_samples``)."""
    return evaluate(model, records, resolve_ref(recipe.data.image_root), transform, device,
                    recipe.data.max_length, stage.eval_batch_size, stage.max_new_tokens, features_fn)


def eval_row(m: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's numbers as one metrics.jsonl row: scalars, and ``acc/<type>`` per question type."""
    out = {k: v for k, v in m.items() if isinstance(v, (int, float))}
    out.update({f"acc/{k}": v for k, v in m.get("accuracy_by_type", {}).items()})
    return out


def final_eval(model: VLM, recipe: Recipe, stage_name: str, device: torch.device, features_fn: Any) -> dict[str, Any]:
    """The end-of-stage evaluation of a stage trained with sharded weights, on an unsharded model."""
    stage = recipe.stages[stage_name]
    records = load_records(resolve_ref(stage.eval_data))[: stage.eval_max_samples]
    transform = ImageTransform(model.encoder.image_size, model.encoder.mean, model.encoder.std)
    return run_eval(model, recipe, stage, records, transform, device, features_fn)


def keep_predictions(run_dir, stage_name: str, metrics: dict[str, Any], write: bool) -> None:
    """Move the evaluation's per-question rows out of ``metrics`` (they stay out of summary.json) into
    ``<run_dir>/predictions_<stage>.jsonl``, written atomically by the process that writes the run (``write``)."""
    rows = metrics.pop("predictions", None)
    if rows is not None and write:
        write_predictions(predictions_path(run_dir, stage_name), rows)
