"""The real recipe at its real shapes with random weights: shared by bench_real_shapes.py (CPU, fp32, through
``vlkit train``) and gpu_check.py (one GPU, bf16, vlkit's step against transformers' LlavaForConditionalGeneration).

    recipe   recipes/llava15_qwen2.5-1.5b_clip-l336.yaml + RANDOM (encoder.random_init, llm.random_init, the shipped
             ChatML toy tokenizer); the published configs come from vlkit.plan.configs (no hub access)
    photos   the real photos matplotlib ships (grace_hopper.jpg, Minduka_Present_Blue_Pack.png) and, when
             scikit-learn is installed, its two sample photos (china.jpg, flower.jpg)
    data     LLaVA-format records over those photos: captions (align) and questions, one of them multi-turn
             (instruct); written to a folder and read back through vlkit's own checks, dataset and collator

``tiny=True`` swaps the two models for the toy world's configs (same code path, seconds on a CPU).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
REAL_RECIPE = ROOT / "recipes" / "llava15_qwen2.5-1.5b_clip-l336.yaml"
RANDOM = ["encoder.random_init=true", "llm.random_init=true", "llm.tokenizer=toy:tokenizer"]
IGNORE = -100

CAPTIONS = [
    "A portrait photograph of a woman in a dark naval uniform with medals, in front of a flag.",
    "A small blue gift box with a white ribbon on a plain background.",
    "A red temple roof among green trees under a clear sky.",
    "A close-up of a yellow and orange flower with many thin petals.",
]
QUESTIONS = [
    ("What is the person in the photo wearing?", "A dark naval uniform with several medals pinned on the chest, "
     "and a white shirt with a tie under the jacket."),
    ("What colour is the main object, and what is it?", "It is blue. The object is a small wrapped present with a "
     "white ribbon tied around it."),
    ("Describe the scene in one sentence.", "A traditional building with a curved red roof stands among trees on a "
     "sunny day."),
    ("How many petals can you see, roughly?", "There are many petals, more than twenty, spreading out from the "
     "centre of the flower."),
]


def sample_photos() -> list[Path]:
    """Real photos that ship with installed packages (matplotlib always, scikit-learn when present)."""
    import matplotlib

    sample = Path(matplotlib.get_data_path()) / "sample_data"
    photos = [sample / "grace_hopper.jpg", sample / "Minduka_Present_Blue_Pack.png"]
    try:
        import sklearn.datasets

        images = Path(sklearn.datasets.__file__).parent / "images"
        photos += [images / "china.jpg", images / "flower.jpg"]
    except ImportError:
        pass
    found = [p for p in photos if p.is_file()]
    if not found:
        raise FileNotFoundError(f"no sample photos found (looked for {', '.join(map(str, photos))})")
    return found


def write_data(out: Path, n: int) -> dict[str, Any]:
    """``n`` align and ``n`` instruct records over the sample photos, copied into ``out/images``."""
    photos = sample_photos()
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = []
    for p in photos:
        shutil.copy(p, images / p.name)
        names.append(p.name)
    align, instruct = [], []
    for i in range(n):
        k = i % len(names)
        align.append({"id": f"align-{i}", "image": names[k], "conversations": [
            {"from": "human", "value": "<image>\nWrite a short caption for this photo."},
            {"from": "gpt", "value": CAPTIONS[i % len(CAPTIONS)]}]})
        q, a = QUESTIONS[i % len(QUESTIONS)]
        conv = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
        if i % 4 == 3:  # LLaVA's mix has multi-turn records
            conv += [{"from": "human", "value": "Is it a photograph or a drawing?"},
                     {"from": "gpt", "value": "It is a photograph."}]
        instruct.append({"id": f"instruct-{i}", "image": names[k], "conversations": conv})
    (out / "align.json").write_text(json.dumps(align))
    (out / "instruct.json").write_text(json.dumps(instruct))
    return {"image_root": str(images), "align": str(out / "align.json"), "instruct": str(out / "instruct.json"),
            "photos": names}


def tiny_model_dirs(out: Path) -> list[str]:
    """Overrides pointing both models at config-only copies of the toy world's configs (random_init reads them)."""
    from vlkit.toyworld import resolve_toy

    over = []
    for spec, key in (("toy:clip", "encoder.model"), ("toy:lm", "llm.model")):
        d = out / spec.replace(":", "-")
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(resolve_toy(spec)) / "config.json", d / "config.json")
        over.append(f"{key}={d}")
    return over


def data_overrides(data: dict[str, Any]) -> list[str]:
    return [f"data.image_root={data['image_root']}", f"stages.align.data={data['align']}",
            f"stages.instruct.data={data['instruct']}", "stages.align.eval_data=null", "stages.instruct.eval_data=null"]


def load_real_recipe(overrides: list[str]):
    from vlkit.config import load_recipe

    return load_recipe(REAL_RECIPE, RANDOM + list(overrides))


def make_batch(model, recipe, stage: str, batch_size: int) -> dict[str, Any]:
    """The first ``batch_size`` records of the stage's data through vlkit's checks, dataset and collator."""
    from vlkit.data.collate import Collator
    from vlkit.data.llava import ImageTransform, LlavaDataset, check_records, load_records

    records = load_records(recipe.stages[stage].data)[:batch_size]
    examples, problems = check_records(records, recipe.data.image_root, model.tokenizer, model.image_token_id,
                                       model.sequence_image_tokens, recipe.data.max_length)
    if problems:
        raise ValueError("; ".join(f"{p.id}: {p.message}" for p in problems))
    enc = model.encoder
    ds = LlavaDataset(examples, recipe.data.image_root, ImageTransform(enc.image_size, enc.mean, enc.std))
    return Collator(model.tokenizer.pad_token_id)([ds[i] for i in range(len(examples))])


def batch_facts(b: dict[str, Any], image_token_id: int) -> dict[str, Any]:
    mask = b["attention_mask"].bool()
    lengths = mask.sum(1).tolist()
    sup = int((b["labels"][:, 1:] != IGNORE).sum())
    return {"samples": int(b["input_ids"].shape[0]), "padded_length": int(b["input_ids"].shape[1]),
            "sequence_lengths": [int(x) for x in lengths], "real_tokens": int(mask.sum()),
            "images": int(b["pixel_values"].shape[0]) if b["pixel_values"] is not None else 0,
            "image_tokens": int((b["input_ids"] == image_token_id).sum()), "supervised_tokens": sup,
            "supervised_fraction": sup / (b["input_ids"].shape[0] * max(b["input_ids"].shape[1] - 1, 1))}


def to_device(b: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}


def planned(recipe, stage: str, facts: dict[str, Any], device: str, **kw: Any):
    """``vlkit plan``'s StagePlan at the batch's exact shape (micro-batch, padded length, supervised fraction)."""
    from vlkit.plan import plan

    return plan(recipe, [stage], gpus=1, zero=0, device=device, micro_batch=facts["samples"],
                seq_len=facts["padded_length"], supervised_frac=max(facts["supervised_fraction"], 1e-6),
                **kw).stages[0]


def plan_summary(sp) -> dict[str, Any]:
    rows = {r.component: {"params": r.params, "trainable": r.trainable, "weights_gb": r.weights / 1e9,
                          "grads_gb": r.grads / 1e9, "optimizer_gb": r.optimizer / 1e9,
                          "activations_gb": r.activations / 1e9} for r in sp.rows}
    return {"total_gb": sp.total / 1e9, "micro_batch": sp.micro_batch, "seq_len": sp.seq_len,
            "image_tokens": sp.image_tokens, "peak_phase": sp.peak_phase, "rows": rows,
            "activation_terms_gb": {k: v / 1e9 for k, v in sp.activation_terms.items()}}
