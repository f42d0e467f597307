"""Answer questions with a trained run, and evaluate one on any LLaVA file (what ``vlkit predict`` and
``vlkit eval`` call)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlkit.data.llava import ImageTransform, load_records
from vlkit.evaluate import evaluate, generate_answers, write_predictions
from vlkit.model import VLM, resolve_ref
from vlkit.runs import load_run

__all__ = ["evaluate_run", "load_run", "predict_records"]  # load_run lives in vlkit.runs; kept importable from here


def predict_records(model: VLM, records: list[dict[str, Any]], image_root, device: torch.device,
                    **gen: Any) -> list[str]:
    t = ImageTransform(model.encoder.image_size, model.encoder.mean, model.encoder.std)
    max_new = gen.pop("max_new_tokens", 32)
    return generate_answers(model, records, image_root, t, device, max_new_tokens=max_new, **gen)


def eval_predictions_path(run: str | Path, data: str) -> Path:
    """Where ``vlkit eval`` keeps its answers by default: ``<run>/predictions_eval_<data file stem>.jsonl``."""
    return Path(run) / f"predictions_eval_{Path(str(data).removeprefix('toy:')).stem}.jsonl"


def evaluate_run(run: str | Path, data: str, image_root: str | None = None, max_samples: int | None = None,
                 batch_size: int = 32, max_new_tokens: int = 16, predictions: str | Path | None = None) -> dict[str, Any]:
    """Validation loss, generation accuracy per question type and BLEU of a run (or a vlkit export) on a LLaVA
    file (``toy:`` paths allowed); images from ``image_root``, else the run's ``data.image_root``. With
    ``predictions`` (a path), the per-question rows are written there as JSON lines and left out of the result.
    ``random_weights`` names the components built with random_init."""
    from vlkit.export import load_model
    from vlkit.random_init import random_weight_parts

    model, recipe, device = load_model(run)
    records = load_records(resolve_ref(data))[:max_samples]
    root = resolve_ref(image_root or recipe.data.image_root)
    t = ImageTransform(model.encoder.image_size, model.encoder.mean, model.encoder.std)
    metrics = evaluate(model, records, root, t, device, recipe.data.max_length, batch_size, max_new_tokens)
    if predictions is not None:
        write_predictions(predictions, metrics.pop("predictions"))
    metrics["random_weights"] = random_weight_parts(model)  # the result lines say so (vlkit eval)
    return metrics
