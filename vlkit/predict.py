"""Load a trained run directory and answer questions with it."""
from __future__ import annotations

from typing import Any

import torch

from vlkit.data.llava import ImageTransform
from vlkit.evaluate import generate_answers
from vlkit.model import VLM
from vlkit.runs import load_run

__all__ = ["load_run", "predict_records"]  # load_run lives in vlkit.runs; kept importable from here


def predict_records(model: VLM, records: list[dict[str, Any]], image_root, device: torch.device,
                    **gen: Any) -> list[str]:
    t = ImageTransform(model.encoder.image_size, model.encoder.mean, model.encoder.std)
    max_new = gen.pop("max_new_tokens", 32)
    return generate_answers(model, records, image_root, t, device, max_new_tokens=max_new, **gen)
