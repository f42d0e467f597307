"""What ``vlkit inspect`` shows: the built model's parts and one templated sample with its label mask."""
from __future__ import annotations

from typing import Any

from rich.text import Text

from vlkit.config import Recipe
from vlkit.model import VLM, build_model, parameter_counts
from vlkit.random_init import NOTE, random_weight_parts
from vlkit.registry import FAMILIES


def describe_model(recipe: Recipe) -> tuple[dict[str, Any], VLM]:
    model = build_model(recipe)
    counts = parameter_counts(model)
    fams = {"encoder": "encoders", "tokens": "token_strategies", "projector": "projectors", "fusion": "fusions",
            "llm": "llms"}
    rows = []
    random_parts = random_weight_parts(model)
    for part, fam in fams.items():
        name = getattr(recipe, part).name
        rows.append({"part": part, "name": name + (" (RANDOM WEIGHTS)" if part in random_parts else ""),
                     "source": FAMILIES[fam].source(name), **counts[part]})
    enc = model.encoder
    facts = {
        "encoder": f"embed_dim={enc.embed_dim} image_size={enc.image_size} grid={getattr(enc, 'grid', None)} "
                   f"has_cls={getattr(enc, 'has_cls', None)}",
        "image tokens per image": model.num_image_tokens,
        "projector": f"{recipe.projector.name}: [B, N, {_in_dim(model)}] -> [B, {model.num_image_tokens}, "
                     f"{model.llm.hidden_size}]",
        "llm hidden size": model.llm.hidden_size,
        "stages": " -> ".join(recipe.train.stages),
    }
    if random_parts:
        facts["weights"] = f"{NOTE} (random_init) in {', '.join(random_parts)}: shapes only, no trained weights"
    return {"components": rows, "facts": facts}, model


def _in_dim(model: VLM) -> int:
    return model.tokens.out_dim(model.encoder.embed_dim) if hasattr(model.tokens, "out_dim") else model.encoder.embed_dim


def render_example(tokenizer, input_ids: list[int], labels: list[int], image_token_id: int) -> Text:
    """Tokens coloured by role: supervised (green), masked (dim), image run collapsed to ``<image>×M``."""
    out = Text()
    i = 0
    while i < len(input_ids):
        if input_ids[i] == image_token_id:
            j = i
            while j < len(input_ids) and input_ids[j] == image_token_id:
                j += 1
            out.append(f"<image>×{j - i}", style="bold magenta")
            i = j
            continue
        piece = tokenizer.decode([input_ids[i]])
        out.append(piece, style="bold green" if labels[i] != -100 else "dim")
        i += 1
    return out


def sample_view(recipe: Recipe, model: VLM, stage: str | None = None) -> Text:
    from vlkit.data.llava import load_records, tokenize_record
    from vlkit.model import resolve_ref

    stage = stage or recipe.train.stages[0]
    cfg = recipe.stages[stage]
    records = load_records(resolve_ref(cfg.data))
    ex = tokenize_record(records[0], model.tokenizer, model.image_token_id, model.image_span,
                         recipe.data.max_length)
    head = Text(f"\nsample {records[0].get('id', '#0')} of stage '{stage}' ({ex.length} tokens, "
                f"{ex.num_supervised} supervised: green = loss, dim = masked)\n", style="bold")
    if model.cells_note:
        head = Text(model.cells_note + "\n", style="yellow") + head
    return head + render_example(model.tokenizer, ex.input_ids, ex.labels, model.image_token_id)
