"""Prefix fusion with cell names: which image tokens each cell gets, the span one <image> becomes, and that the
image embeddings land in the slots after their cell's name (train, generation prompt and lmms-eval alike)."""
from __future__ import annotations

import pytest
import torch

from vlkit.components.fusion import PrefixFusion
from vlkit.config import ConfigError, load_recipe
from vlkit.data.llava import tokenize_record
from vlkit.data.toy_scenes import COMPASS
from vlkit.evaluate import prompt_example
from vlkit.export.hf_llava import hf_llava_problems
from vlkit.model import build_model

CELLS = list(COMPASS)


def test_tokens_split_by_centre_into_cells():
    f = PrefixFusion(CELLS)
    assert [len(g) for g in f.cell_groups((6, 6))] == [4] * 9
    assert f.cell_groups((6, 6))[0] == [0, 1, 6, 7] and f.cell_groups((6, 6))[8] == [28, 29, 34, 35]
    # 8 x 8 patches over 3 x 3 cells: rows and columns 3, 2, 3 by patch centre
    assert [len(g) for g in f.cell_groups((8, 8))] == [9, 6, 9, 6, 4, 6, 9, 6, 9]
    assert f.cell_groups((8, 8))[4] == [27, 28, 35, 36]
    assert sorted(i for g in f.cell_groups((8, 8)) for i in g) == list(range(64))
    assert f.cell_groups((3, 3)) == [[i] for i in range(9)]
    # a non-square grid (4 rows x 8 columns): rows 1, 2, 1 and columns 3, 2, 3 by token centre
    assert [len(g) for g in f.cell_groups((4, 8))] == [3, 2, 3, 6, 4, 6, 3, 2, 3]
    assert f.cell_groups((4, 8))[0] == [0, 1, 2]
    # a grid coarser than the cells (1 or 4 pooled tokens): no token lies in one cell, none is named
    assert f.cell_groups((1, 1)) is None and f.cell_groups((2, 2)) is None and f.order((2, 2)) is None
    assert f.cell_groups((2, 8)) is None
    assert PrefixFusion().cell_groups((8, 8)) is None


@pytest.mark.parametrize("cells, fmt, match", [
    (["a", "b", "c"], "{name}:", "fusion.cells: must be g\\*g non-empty names"),
    (["a"] * 4, "{name}:", "fusion.cells: names must be distinct; \\['a'\\] repeat"),
    (["a", "b", "c", "d"], "cell:", "fusion.cell_format: must be a string containing '\\{name\\}'"),
    ("abcdefghi", "{name}:", "fusion.cells: must be a list"),  # a string is not split into nine letters
    ([], "{name}:", "fusion.cells: an empty list"),
])
def test_bad_cells_are_refused(cells, fmt, match):
    with pytest.raises(ValueError, match=match):
        PrefixFusion(cells, fmt)


@pytest.mark.parametrize("override, message", [
    ("fusion.cells=northwest", "fusion.cells: must be a list"),
    ("fusion.cells=[a,b,c]", "fusion.cells: must be g*g"),
    ("fusion.cells=[a,b,c,d,a,f,g,h,i]", "fusion.cells: names must be distinct"),
    ("fusion.cell_format=cell", "fusion.cell_format: must be a string containing"),
])
def test_bad_cells_are_refused_when_the_recipe_loads(override, message):
    """Every command that reads the recipe (plan, inspect, data check, train) names the file and the key."""
    with pytest.raises(ConfigError) as info:
        load_recipe("recipes/mlp_patch.yaml", [override])
    assert f"recipes/mlp_patch.yaml: {message}" in str(info.value)


def test_a_later_stage_cannot_ask_for_other_lora_adapters():
    """LoRA is attached once, by the first stage that trains it (align in the default): a different r in instruct
    would train align's adapters while the recipe says otherwise."""
    with pytest.raises(ConfigError) as info:
        load_recipe("recipes/mlp_patch.yaml", ["stages.instruct.lora.r=8"])
    assert "stages.instruct.lora.r: 8" in str(info.value) and "stages.align.lora.r: 16" in str(info.value)
    load_recipe("recipes/mlp_patch.yaml", ["stages.instruct.lora.r=8", "stages.align.lora.r=8"])
    load_recipe("recipes/mlp_patch.yaml", ["stages.instruct.lora.r=8", "stages.align.llm=frozen"])


def test_tokens_that_form_no_grid_go_in_unnamed():
    assert PrefixFusion(CELLS).cell_groups(None) is None and PrefixFusion(CELLS).order(None) is None


@pytest.mark.parametrize("overrides, grid, named", [
    (["tokens.name=patch"], (8, 8), True),
    ([], (4, 4), True),  # the default: pooled to 16
    (["tokens.name=pooled", "tokens.num_tokens=9"], (3, 3), True),
    (["tokens.name=pooled", "tokens.num_tokens=16"], (4, 4), True),
    (["tokens.name=pooled", "tokens.num_tokens=4"], (2, 2), False),  # coarser than the cells
    (["tokens.name=merged", "tokens.num_tokens=9"], (3, 3), True),  # one concatenated token per cell
    (["tokens.name=cls"], None, False),
    (["tokens.name=cls_patch"], None, False),  # the CLS token lies in no cell
    # 9 or 16 tokens that are not image regions: a CLS expanded by a linear map, learned queries
    (["tokens.name=cls", "projector.name=cls_reshape", "projector.num_tokens=9"], None, False),
    (["projector.name=cross_attention", "projector.num_tokens=16"], None, False),
])
def test_only_tokens_with_a_grid_get_cell_names(tiny_toy_world, overrides, grid, named):
    model = build_model(load_recipe("mlp_patch", overrides))
    assert model.image_grid == grid
    span = model.image_span
    assert span.count(model.image_token_id) == model.num_image_tokens
    assert (len(span) > model.num_image_tokens) == named
    assert (model.cells_note is None) == named


@pytest.fixture(scope="module")
def marked(tiny_toy_world):
    torch.manual_seed(0)
    return build_model(load_recipe("mlp_patch", [f"fusion.cells={CELLS}", "tokens.name=pooled",
                                                 "tokens.num_tokens=36"]))


def _rec():
    return {"id": "x", "image": "train/000000.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat colour is the object in the north?"},
                              {"from": "gpt", "value": "red"}]}


def test_span_names_each_cell_before_its_tokens(marked):
    tok, img = marked.tokenizer, marked.image_token_id
    span = marked.image_span
    assert span.count(img) == marked.num_image_tokens == 36
    text = tok.decode(span)
    assert text.startswith("northwest:" + "<image>" * 4 + ", north:" + "<image>" * 4)
    assert text.endswith(", southeast:" + "<image>" * 4)
    ex = tokenize_record(_rec(), tok, img, span, 400)
    assert ex.input_ids.count(img) == 36
    assert tok.decode(ex.input_ids).count("northwest:") == 1
    prompt, answer = prompt_example(_rec(), tok, img, span)
    assert answer == "red" and prompt.input_ids.count(img) == 36 and "southeast:<image>" in tok.decode(prompt.input_ids)


def test_image_embeddings_land_after_their_cell_name(marked):
    tok, img = marked.tokenizer, marked.image_token_id
    ids = torch.tensor([tokenize_record(_rec(), tok, img, marked.image_span, 400).input_ids])
    embeds = torch.arange(36, dtype=torch.float32).view(1, 36, 1).expand(1, 36, marked.llm.hidden_size)
    fused = marked.fuse(ids, embeds.clone(), None)
    slots = (ids[0] == img).nonzero().flatten()
    got = fused[0, slots, 0].long().tolist()
    # cell by cell, each cell's 2 x 2 pooled tokens row-major: northwest holds tokens 0, 1, 6, 7 of the 6 x 6 grid
    assert got == [i for g in marked.fusion.cell_groups((6, 6)) for i in g]
    assert got[:8] == [0, 1, 6, 7, 2, 3, 8, 9]
    # the text around them is the LLM's own embedding of the names
    before = int(slots[0])
    assert tok.decode(ids[0, before - 8:before]).endswith("northwest:")
    assert torch.equal(fused[0, before - 1], marked.llm.embed_tokens(ids[:, before - 1])[0])


def test_patch_embeddings_land_in_their_cells_at_64_tokens(tiny_toy_world):
    """The default's uneven split (3, 2, 3 patch rows and columns per cell): each name is followed by exactly the
    patches whose centres lie in its cell."""
    model = build_model(load_recipe("mlp_patch", ["tokens.name=patch"]))
    tok, img = model.tokenizer, model.image_token_id
    ids = torch.tensor([tokenize_record(_rec(), tok, img, model.image_span, 400).input_ids])
    embeds = torch.arange(64, dtype=torch.float32).view(1, 64, 1).expand(1, 64, model.llm.hidden_size)
    fused = model.fuse(ids, embeds.clone(), None)
    slots = (ids[0] == img).nonzero().flatten().tolist()
    got = fused[0, slots, 0].long().tolist()
    runs, start = [], 0  # the slots in runs of consecutive positions: one run per cell
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[i - 1] + 1:
            runs.append(got[start:i])
            start = i
    assert [len(r) for r in runs] == [9, 6, 9, 6, 4, 6, 9, 6, 9]
    assert runs[0] == [0, 1, 2, 8, 9, 10, 16, 17, 18]  # northwest: patch rows 0-2, columns 0-2
    assert runs[4] == [27, 28, 35, 36]  # centre: rows 3-4, columns 3-4
    assert runs[8] == [45, 46, 47, 53, 54, 55, 61, 62, 63]  # southeast
    sizes = [9, 6, 9, 6, 4, 6, 9, 6, 9]
    assert tok.decode(model.image_span) == ", ".join(f"{c}:" + "<image>" * n for c, n in zip(CELLS, sizes))


def test_training_and_generation_prompts_carry_the_names(tiny_toy_world):
    """What the stages train on and what evaluation generates from both hold the model's span, names included."""
    from rich.console import Console

    from vlkit.data.llava import ImageTransform
    from vlkit.evaluate import generate_answers
    from vlkit.model import resolve_ref
    from vlkit.train.data import load_stage_data

    recipe = load_recipe("mlp_patch")
    model = build_model(recipe)
    span = model.image_span
    assert len(span) > 16

    def holds_span(ids):
        ids = list(ids)
        at = ids.index(model.image_token_id)
        first = at - span.index(model.image_token_id)
        return ids[first:first + len(span)] == span

    transform = ImageTransform(model.encoder.image_size, model.encoder.mean, model.encoder.std)
    data = load_stage_data(recipe, "instruct", model, transform, Console(quiet=True))
    assert all(holds_span(ex.input_ids) for ex in data.train.examples[:20])
    seen = []

    def capture(input_ids, attention_mask, **kw):
        seen.extend(input_ids.tolist())
        return torch.full((input_ids.shape[0], 1), model.tokenizer.eos_token_id)

    model.generate = capture
    generate_answers(model, data.eval_records[:3], resolve_ref(recipe.data.image_root), transform,
                     torch.device("cpu"), max_new_tokens=1)
    assert len(seen) == 3 and all(holds_span(ids) for ids in seen)


def test_data_check_counts_the_names(tiny_toy_world):
    """``vlkit data check --recipe`` lays a record out as training does: with the names the span is longer."""
    from vlkit.data.llava import check_records, load_records
    from vlkit.model import image_span_for, load_tokenizer, resolve_ref

    recipe = load_recipe("mlp_patch", ["tokens.name=patch"])  # 64 tokens: "tight" below fits them without names
    tok, img = load_tokenizer(recipe)
    span = image_span_for(recipe, tok, img)
    assert span == build_model(recipe).image_span and len(span) > 64
    recs = load_records(resolve_ref(recipe.stages["align"].eval_data))[:20]
    root = resolve_ref(recipe.data.image_root)
    tight = max(len(tokenize_record(r, tok, img, 64, 10**6).input_ids) for r in recs)  # long enough without names
    good, problems = check_records(recs, root, tok, img, span, tight, open_images=False)
    assert problems and all(p.kind == "too_long" for p in problems)


def test_cls_with_cells_has_no_names(tiny_toy_world):
    model = build_model(load_recipe("mlp_patch", [f"fusion.cells={CELLS}", "tokens.name=cls"]))
    assert model.image_span == [model.image_token_id]
    assert "no 2-D layout" in model.cells_note


def test_hf_llava_export_refuses_cell_names(tiny_toy_world):
    recipe = load_recipe("mlp_patch", [f"fusion.cells={CELLS}"])
    problems = hf_llava_problems(recipe)
    assert any("fusion.cells" in p and "--format vlkit" in p for p in problems)
