"""An lmms-eval task over any LLaVA-format file, offline: ``lmms-eval --model vlkit --tasks NAME --include_path DIR``.

``write_task`` writes into ``out``: the questions as JSON lines (``question``, ``answer``, ``question_type``,
``image`` as an absolute path), ``NAME.yaml`` (a ``generate_until`` task over that local file: lmms-eval loads it
with ``datasets.load_dataset("json", data_files=...)``, no hub) and ``NAME_utils.py`` (image loading, prompt,
scoring). A record's first human turn is the question and the first assistant turn the reference, as in
``vlkit eval``; the score is vlkit's exact match after :func:`vlkit.evaluate.normalize_answer`, so the task's
``exact_match`` is the ``accuracy`` ``vlkit eval`` reports for the same records and run.

    python -m vlkit.lmms_eval_task DATA.json --image-root DIR --out TASKDIR [--name vlkit_llava] [--max-samples N]

This module does not need lmms-eval; the written utils module imports vlkit (and PIL) only.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import yaml

_UTILS = '''"""Written by vlkit.lmms_eval_task: the task's documents, prompt and score (vlkit eval's exact match)."""
from PIL import Image

from vlkit.data.llava import load_image
from vlkit.evaluate import normalize_answer


def doc_to_visual(doc):
    return [load_image(doc["image"])] if doc.get("image") else []


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_target(doc):
    return doc["answer"]


def process_results(doc, results):
    prediction = results[0].strip() if results else ""
    return {"exact_match": float(normalize_answer(prediction) == normalize_answer(doc["answer"]))}
'''


def _first_turns(rec: dict[str, Any], index: int) -> tuple[str, str]:
    conv = rec.get("conversations") or []
    human = next((t["value"] for t in conv if t.get("from") in ("human", "user")), None)
    answer = next((t["value"] for t in conv if t.get("from") in ("gpt", "assistant")), None)
    if human is None or answer is None:
        raise ValueError(f"record #{index} ({rec.get('id', '?')}) has no human and assistant turn")
    return human, answer


def write_task(records: list[dict[str, Any]], image_root: str | Path, out: str | Path, name: str = "vlkit_llava",
               max_new_tokens: int = 16) -> Path:
    """Write the task folder for ``records`` (LLaVA format, images under ``image_root``); returns ``out``."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"task name '{name}' must be a Python identifier (it names the utils module)")
    from vlkit.data.llava import safe_image_path

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, rec in enumerate(records):
        question, answer = _first_turns(rec, i)
        image = str(safe_image_path(image_root, rec["image"]).resolve()) if rec.get("image") else None
        lines.append(json.dumps({"id": str(rec.get("id", i)), "question": question, "answer": answer,
                                 "question_type": str(rec.get("question_type", "all")), "image": image}))
    data = out / f"{name}.jsonl"
    data.write_text("\n".join(lines) + "\n")
    utils = f"{name}_utils"
    (out / f"{utils}.py").write_text(_UTILS)
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_visual": f"!function {utils}.doc_to_visual",
        "doc_to_text": f"!function {utils}.doc_to_text",
        "doc_to_target": f"!function {utils}.doc_to_target",
        "process_results": f"!function {utils}.process_results",
        "generation_kwargs": {"max_new_tokens": max_new_tokens, "do_sample": False, "until": []},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 0.0, "written_by": "vlkit.lmms_eval_task"},
    }
    text = yaml.safe_dump(task, sort_keys=False)
    # lmms-eval resolves functions through YAML's !function tag (safe_dump would quote it)
    text = re.sub(r"'(!function [^']+)'", r"\1", text)
    (out / f"{name}.yaml").write_text(text)
    return out


def main(argv: list[str] | None = None) -> None:
    from vlkit.data.llava import load_records
    from vlkit.model import resolve_ref as _resolve

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="LLaVA-format JSON / JSONL file (toy: paths allowed)")
    ap.add_argument("--image-root", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--name", default="vlkit_llava")
    ap.add_argument("--max-samples", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    records = load_records(_resolve(args.data))[: args.max_samples]
    out = write_task(records, _resolve(args.image_root), args.out, args.name, args.max_new_tokens)
    print(f"wrote task '{args.name}' ({len(records)} questions) to {out}; run: lmms-eval --model vlkit "
          f"--model_args run=RUN_DIR --tasks {args.name} --include_path {out}")


if __name__ == "__main__":  # pragma: no cover
    main()
