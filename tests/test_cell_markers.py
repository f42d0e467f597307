"""Prefix fusion with cell names: which image tokens each cell gets, the span one <image> becomes, and that the
image embeddings land in the slots after their cell's name (train, generation prompt and lmms-eval alike)."""
from __future__ import annotations

import pytest
import torch

from vlkit.components.fusion import PrefixFusion
from vlkit.config import load_recipe
from vlkit.data.llava import tokenize_record
from vlkit.data.toy_scenes import COMPASS
from vlkit.evaluate import prompt_example
from vlkit.export.hf_llava import hf_llava_problems
from vlkit.model import build_model

CELLS = list(COMPASS)


def test_tokens_split_by_centre_into_cells():
    f = PrefixFusion(CELLS)
    assert [len(g) for g in f.cell_groups(36)] == [4] * 9
    assert f.cell_groups(36)[0] == [0, 1, 6, 7] and f.cell_groups(36)[8] == [28, 29, 34, 35]
    # 8 x 8 patches over 3 x 3 cells: rows and columns 3, 2, 3 by patch centre
    assert [len(g) for g in f.cell_groups(64)] == [9, 6, 9, 6, 4, 6, 9, 6, 9]
    assert f.cell_groups(64)[4] == [27, 28, 35, 36]
    assert sorted(i for g in f.cell_groups(64) for i in g) == list(range(64))
    assert f.cell_groups(9) == [[i] for i in range(9)]
    # fewer tokens than cells (a CLS, 1 or 4 pooled tokens): no token lies in one cell, none is named
    assert f.cell_groups(1) is None and f.cell_groups(4) is None and f.order(4) is None
    assert PrefixFusion().cell_groups(64) is None


@pytest.mark.parametrize("cells, fmt, match", [
    (["a", "b", "c"], "{name}:", "g\\*g non-empty names"),
    (["a"] * 4, "{name}:", "distinct"),
    (["a", "b", "c", "d"], "cell:", "must contain '\\{name\\}'"),
])
def test_bad_cells_are_refused(cells, fmt, match):
    with pytest.raises(ValueError, match=match):
        PrefixFusion(cells, fmt)


def test_tokens_that_form_no_grid_go_in_unnamed():
    # cls_patch: 1 + 64 tokens, the CLS token lies in no cell
    assert PrefixFusion(CELLS).cell_groups(65) is None and PrefixFusion(CELLS).order(65) is None


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
    assert got == [i for g in marked.fusion.cell_groups(36) for i in g]
    assert got[:8] == [0, 1, 6, 7, 2, 3, 8, 9]
    # the text around them is the LLM's own embedding of the names
    before = int(slots[0])
    assert tok.decode(ids[0, before - 8:before]).endswith("northwest:")
    assert torch.equal(fused[0, before - 1], marked.llm.embed_tokens(ids[:, before - 1])[0])


def test_cls_with_cells_has_no_names(tiny_toy_world):
    model = build_model(load_recipe("mlp_patch", [f"fusion.cells={CELLS}", "tokens.name=cls"]))
    assert model.image_span == [model.image_token_id]


def test_hf_llava_export_refuses_cell_names(tiny_toy_world):
    recipe = load_recipe("mlp_patch", [f"fusion.cells={CELLS}"])
    problems = hf_llava_problems(recipe)
    assert any("fusion.cells" in p and "--format vlkit" in p for p in problems)
