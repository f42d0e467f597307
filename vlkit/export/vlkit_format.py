"""The ``vlkit`` export format: the recipe plus every trained tensor; :func:`load_model` reads it or a run directory."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vlkit import __version__
from vlkit.checkpoint import load_trainable
from vlkit.config import dump_recipe, load_recipe
from vlkit.export.common import EXPORT_VERSION, ExportError, complete
from vlkit.model import build_model
from vlkit.runs import attach_lora, load_run, pick_device


def _write_vlkit(model, recipe, run_dir: Path, out: Path, used: dict[str, str], lora_stage: str | None,
                 touched: set[int]) -> dict[str, Any]:
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if id(p) in touched}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "vlkit_export": "vlkit"})
    (out / "config.yaml").write_text(dump_recipe(recipe))
    info = {
        "format": "vlkit", "export_version": EXPORT_VERSION, "vlkit_version": __version__,
        "source_run": str(run_dir.resolve()), "recipe": recipe.name, "identity": recipe.identity(),
        "stages": used, "complete": complete(recipe, used), "lora_stage": lora_stage,
        "num_image_tokens": model.num_image_tokens, "tensors": len(tensors),
        "parameters": int(sum(t.numel() for t in tensors.values())),
        "note": "base encoder/LLM weights are rebuilt from the recipe's model references",
    }
    return info


def load_export(path: str | Path, device: str | torch.device | None = None):
    """A ``vlkit``-format export as ``(model, recipe, device)``, like :func:`vlkit.runs.load_run`."""
    path = Path(path)
    info = read_export_info(path)
    if info.get("format") != "vlkit":
        raise ExportError(f"{path} is a '{info.get('format')}' export; only 'vlkit' exports load into vlkit "
                          "(load an hf-llava export with transformers' LlavaForConditionalGeneration)")
    recipe = load_recipe(path / "config.yaml")
    dev = torch.device(device) if device is not None else pick_device(recipe.train.device)
    model = build_model(recipe)
    if info.get("lora_stage"):
        attach_lora(model, recipe.stages[info["lora_stage"]])
    load_trainable(model, path / "model.safetensors")
    return model.to(dev).eval(), recipe, dev


def read_export_info(path: str | Path) -> dict[str, Any]:
    p = Path(path) / "export.json"
    if not p.exists():
        raise FileNotFoundError(f"{path} is not a vlkit export (no export.json)")
    return json.loads(p.read_text())


def is_export(path: str | Path) -> bool:
    return (Path(path) / "export.json").exists()


def load_model(path: str | Path):
    """A run directory or a ``vlkit``-format export as ``(model, recipe, device)`` (for ``predict`` / ``eval``)."""
    if is_export(path):
        return load_export(path)
    return load_run(path)
