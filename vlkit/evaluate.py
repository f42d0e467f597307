"""Evaluation: validation loss / perplexity, generation accuracy (normalised exact match, per question type), BLEU."""
from __future__ import annotations

import math
import re
import string
from collections import defaultdict
from typing import Any, Iterable, Sequence

import torch

from vlkit.data.collate import Collator
from vlkit.data.references import reference_report
from vlkit.data.llava import IGNORE, Example, LlavaDataset, image_span, to_messages, tokenize_record

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace (VQA-style normalisation)."""
    text = _PUNCT.sub(" ", text.lower())
    words = [w for w in text.split() if w not in ("a", "an", "the")]
    return " ".join(words)


def move(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def batches(dataset, collator: Collator, batch_size: int) -> Iterable[dict[str, Any]]:
    for start in range(0, len(dataset), batch_size):
        yield collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])


@torch.no_grad()
def eval_loss(model, dataset: LlavaDataset, batch_size: int, device: torch.device, features_fn=None) -> dict[str, float]:
    """Token-weighted mean loss over supervised tokens, and its perplexity."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    collator = Collator(model.tokenizer.pad_token_id)
    dataset.load_images = features_fn is None
    for batch in batches(dataset, collator, batch_size):
        batch = move(batch, device)
        feats = features_fn(batch) if features_fn else None
        out = model(batch["input_ids"], batch["attention_mask"], batch["labels"],
                    pixel_values=None if feats is not None else batch["pixel_values"], features=feats,
                    image_index=batch["image_index"])
        total += float(out.loss_sum)
        count += out.num_tokens
    model.train(was)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def prompt_example(rec: dict[str, Any], tokenizer, image_token_id: int,
                   num_image_tokens: int | Sequence[int]) -> tuple[Example, str]:
    """The record's first question as a generation prompt, and its reference answer (``num_image_tokens``: a count
    or the model's ``image_span``)."""
    conv = rec["conversations"]
    k = next(i for i, t in enumerate(conv) if t["from"] in ("gpt", "assistant"))
    prompt_text = tokenizer.apply_chat_template(to_messages(conv[:k]), tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    if rec.get("image"):
        at = ids.index(image_token_id)
        ids[at:at + 1] = image_span(image_token_id, num_image_tokens)
    return Example(ids, [IGNORE] * len(ids), rec.get("image"), 0, {}), conv[k]["value"]


@torch.no_grad()
def generate_answers(model, records: list[dict[str, Any]], image_root, transform, device: torch.device,
                     batch_size: int = 32, max_new_tokens: int = 16, features_fn=None, **gen_kwargs: Any) -> list[str]:
    was = model.training
    model.eval()
    tok = model.tokenizer
    examples = [prompt_example(r, tok, model.image_token_id, model.image_span)[0] for r in records]
    ds = LlavaDataset(examples, image_root, transform, load_images=features_fn is None)
    collator = Collator(tok.pad_token_id, left_pad=True)
    answers: list[str] = []
    for batch in batches(ds, collator, batch_size):
        batch = move(batch, device)
        feats = features_fn(batch) if features_fn else None
        out = model.generate(batch["input_ids"], batch["attention_mask"],
                             pixel_values=None if feats is not None else batch["pixel_values"], features=feats,
                             image_index=batch["image_index"], max_new_tokens=max_new_tokens, **gen_kwargs)
        answers.extend(t.strip() for t in tok.batch_decode(out, skip_special_tokens=True))
    model.train(was)
    return answers


def prediction_rows(records: list[dict[str, Any]], predictions: list[str]) -> list[dict[str, Any]]:
    """One row per answered question: id, question type, reference answer, prediction and whether they match
    (normalised exact match); what ``predictions.jsonl`` keeps so that a study can pair arms question by
    question."""
    rows = []
    for rec, pred in zip(records, predictions):
        ref = next(t["value"] for t in rec["conversations"] if t["from"] in ("gpt", "assistant"))
        rows.append({"id": rec.get("id"), "question_type": str(rec.get("question_type", "all")), "reference": ref,
                     "prediction": pred, "correct": normalize_answer(pred) == normalize_answer(ref)})
    return rows


PREDICTIONS = "predictions_{stage}.jsonl"  # in a run directory: the end-of-stage evaluation's answers


def predictions_path(run_dir, stage: str):
    """Where a run keeps the answers of a stage's end-of-stage evaluation."""
    from pathlib import Path

    return Path(run_dir) / PREDICTIONS.format(stage=stage)


def read_predictions(path) -> list[dict[str, Any]]:
    """The rows :func:`write_predictions` wrote; a line that is not a JSON object with ``id``, ``question_type`` and
    ``correct`` is an error naming the file and line."""
    import json

    rows = []
    with open(path) as fh:
        for i, line in enumerate(fh, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not JSON ({exc.msg}); rerun the evaluation to rewrite it") from None
            if not isinstance(row, dict) or not {"id", "question_type", "correct"} <= set(row):
                raise ValueError(f"{path}:{i}: a prediction row needs id, question_type and correct")
            rows.append(row)
    return rows


def write_predictions(path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as JSON lines, written atomically (a reader never sees half a file)."""
    import json
    from pathlib import Path

    from vlkit._atomic import write_text_atomic

    write_text_atomic(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def accuracy_report(records: list[dict[str, Any]], predictions: list[str]) -> dict[str, Any]:
    """Exact match after normalisation, overall and per ``question_type``; BLEU (sacrebleu) over all; and, where
    the records carry them, their references (``reference_report``)."""
    import sacrebleu

    rows = prediction_rows(records, predictions)
    by_type: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        by_type[row["question_type"]].append(int(row["correct"]))
    hits = [int(r["correct"]) for r in rows]
    bleu = sacrebleu.corpus_bleu(predictions, [[r["reference"] for r in rows]]).score if records else 0.0
    report = {
        "accuracy": sum(hits) / max(len(hits), 1),
        "accuracy_by_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())},
        "count_by_type": {k: len(v) for k, v in sorted(by_type.items())},
        "bleu": bleu,
        "n": len(hits),
    }
    refs_report = reference_report(records)
    if refs_report["references"]:  # the toy world's questions carry blind / uniform / position-blind references
        report.update({k: refs_report[k] for k in ("references", "references_by_type", "spatial_types")})
    return report


def evaluate(model, records: list[dict[str, Any]], image_root, transform, device: torch.device, max_length: int,
             batch_size: int = 32, max_new_tokens: int = 16, features_fn=None) -> dict[str, Any]:
    """Validation loss and generation metrics on LLaVA-format records."""
    examples = [tokenize_record(r, model.tokenizer, model.image_token_id, model.image_span, max_length, i)
                for i, r in enumerate(records)]
    metrics: dict[str, Any] = {}
    metrics.update({f"val_{k}": v for k, v in eval_loss(model, LlavaDataset(examples, image_root, transform),
                                                         batch_size, device, features_fn).items()})
    preds = generate_answers(model, records, image_root, transform, device, batch_size, max_new_tokens, features_fn)
    metrics.update(accuracy_report(records, preds))
    metrics["examples"] = [{"id": r.get("id"), "prediction": p} for r, p in zip(records[:5], preds[:5])]
    metrics["predictions"] = prediction_rows(records, preds)  # the caller keeps them (predictions_<stage>.jsonl)
    return metrics
