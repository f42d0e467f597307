"""Export a trained run: ``vlkit`` format (any model) or a Hugging Face ``LlavaForConditionalGeneration``.

``vlkit`` format (``format="vlkit"``) -- works for every recipe::

    OUT/config.yaml        the run's resolved recipe
    OUT/model.safetensors  every parameter some finished stage trained (projector, LoRA adapters as adapters,
                           unfrozen encoder blocks, full-LLM weights), final values, named as in the loaded model
    OUT/export.json        format, source run, stages and checkpoints used, LoRA stage, image tokens

Base weights are not copied: the encoder and LLM are rebuilt from the recipe's model references (hub ids, local
dirs, ``toy:`` paths), exactly as :func:`vlkit.runs.load_run` does. :func:`load_export` loads it back (same model,
identical logits); :func:`load_model` takes either a run directory or a vlkit export.

``hf-llava`` format (``format="hf-llava"``) -- a self-contained ``LlavaForConditionalGeneration`` directory
(config, safetensors weights, generation config, tokenizer with the image token, ``LlavaProcessor`` with a
``CLIPImageProcessor`` and chat template) for the combinations HF Llava can express:

* encoder ``hf_clip`` / ``hf_siglip`` (built-in): ``vision_tower`` = the encoder's ``hf_model`` (trained blocks
  included); ``vision_feature_layer`` = the encoder's ``layer`` as a ``hidden_states`` index (negative layers
  unchanged, block ``k >= 0`` -> ``k + 1``);
* tokens ``patch`` (CLIP: ``vision_feature_select_strategy="default"``, drops the CLS token; SigLIP has no CLS
  token so ``"full"``) or ``cls_patch`` (CLIP only: ``"full"``);
* projector ``mlp`` with depth 2 and hidden size = the LLM's hidden size -> ``linear_1``, GELU, ``linear_2``;
  projector ``linear`` (or ``mlp`` depth 1) is expressed exactly as ``linear_1`` = the projector,
  ``projector_hidden_act="linear"`` (identity), ``linear_2`` = identity matrix with zero bias (costs one extra
  ``H x H`` matrix; the outputs are the same numbers);
* LLM: any built-in ``hf`` causal LM whose decoder is what ``AutoModel`` builds from its config and whose LM head
  has no bias; LoRA adapters are merged (``merge_and_unload``).

Everything else (timm / open_clip / plugin encoders, ``cls`` / ``pooled`` / ``merged`` tokens, ``cross_attention`` /
``cls_reshape`` / deeper MLP / plugin projectors, non-prefix fusion) raises :class:`ExportError` naming the part
and the reason; use ``format="vlkit"`` for those.

Modules: vlkit_format.py (write, load, :func:`load_model`), hf_llava.py (what HF Llava can express; write it),
common.py; :func:`export_run` here picks one and moves the finished directory into place.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from vlkit.config import load_recipe
from vlkit.export.common import EXPORT_VERSION, ExportError
from vlkit.export.hf_llava import DTYPES, HF_ENCODERS, _write_hf_llava, check_hf_llava, hf_llava_problems
from vlkit.export.vlkit_format import _write_vlkit, is_export, load_export, load_model, read_export_info
from vlkit.runs import load_run_tracked

FORMATS = ("hf-llava", "vlkit")

__all__ = ["DTYPES", "EXPORT_VERSION", "FORMATS", "HF_ENCODERS", "ExportError", "check_hf_llava", "export_run",
           "hf_llava_problems", "is_export", "load_export", "load_model", "read_export_info"]


def export_run(run_dir: str | Path, out: str | Path, format: str = "hf-llava", dtype: str | None = None,
               overwrite: bool = False) -> dict[str, Any]:
    """Export the run in ``run_dir`` to the new directory ``out``; returns what ``export.json`` records.

    The directory is assembled beside ``out`` and moved into place at the end, so a failed export leaves nothing.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format '{format}'; valid: {', '.join(FORMATS)}")
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ExportError(f"{out} exists and is not empty; choose another directory or pass --overwrite")
    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
        raise ExportError(f"{out} is inside the run directory {run_dir}; export somewhere else")
    if format == "hf-llava":
        cfg = run_dir / "config.yaml"
        if not cfg.exists():
            raise FileNotFoundError(f"{run_dir} is not a vlkit run directory (no config.yaml)")
        check_hf_llava(load_recipe(cfg))  # before loading any weights
    loaded = load_run_tracked(run_dir)
    model, recipe, used = loaded.model, loaded.recipe, loaded.used
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with torch.no_grad():
            if format == "vlkit":
                info = _write_vlkit(model, recipe, run_dir, tmp, used, loaded.lora_stage, loaded.touched)
            else:
                check_hf_llava(recipe, model)
                info = _write_hf_llava(model, recipe, run_dir, tmp, used, dtype)
        (tmp / "export.json").write_text(json.dumps(info, indent=1))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info
