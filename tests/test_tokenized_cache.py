"""Tokenized records kept between runs (vlkit/data/tokenized.py): reused only for the same data file, tokenizer,
settings and templating code; a reuse gives exactly what templating again gives; a damaged entry is recomputed."""
from __future__ import annotations

import json
from pathlib import Path

from vlkit.config import load_recipe
from vlkit.data.llava import check_records, load_records
from vlkit.data.tokenized import TokenizedCache, tokenizer_fingerprint
from vlkit.model import build_model

LONG = " ".join(["word"] * 200)


def write_data(tmp_path: Path) -> Path:
    recs = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"question {i}?"},
                                                {"from": "gpt", "value": f"answer {i}"}]} for i in range(6)]
    recs.append({"id": "too-long", "conversations": [{"from": "human", "value": LONG}, {"from": "gpt", "value": "x"}]})
    recs.append({"id": "stray-image", "conversations": [{"from": "human", "value": "hi"},
                                                         {"from": "gpt", "value": "<image> x"}]})
    path = tmp_path / "data.json"
    path.write_text(json.dumps(recs))
    return path


def check(model, path: Path, cache_dir: Path, max_length: int = 64):
    cache = TokenizedCache(cache_dir, path, model.tokenizer, model.image_token_id, model.sequence_image_tokens,
                           max_length)
    had = len(cache.memo)
    good, problems = check_records(load_records(path), None, model.tokenizer, model.image_token_id,
                                   model.sequence_image_tokens, max_length, memo=cache.memo)
    assert cache.save() is None
    return had, [(e.input_ids, e.labels, e.image, e.index, e.meta) for e in good], \
        [(p.index, p.id, p.kind, p.message) for p in problems], cache.path


def test_reuse_is_identical_and_keyed_on_everything_it_depends_on(tiny_toy_world, tmp_path):
    model = build_model(load_recipe("mlp_patch"))
    path = write_data(tmp_path)
    cache_dir = tmp_path / "tok"
    plain = check_records(load_records(path), None, model.tokenizer, model.image_token_id,
                          model.sequence_image_tokens, 64)
    had, good, problems, key = check(model, path, cache_dir)
    assert had == 0 and len(good) == 6 and {p[1] for p in problems} == {"too-long", "stray-image"}
    assert good == [(e.input_ids, e.labels, e.image, e.index, e.meta) for e in plain[0]]
    assert problems == [(p.index, p.id, p.kind, p.message) for p in plain[1]]
    # the second run templates nothing and gets the same examples and problems
    had, good2, problems2, key2 = check(model, path, cache_dir)
    # every record that reached templating is kept (stray-image stops at the structure check before it)
    assert had == 7 and key2 == key and good2 == good and problems2 == problems
    # another max_length, an edited data file: other keys
    assert check(model, path, cache_dir, max_length=80)[3] != key
    recs = json.loads(path.read_text())
    recs[0]["conversations"][1]["value"] = "another answer"
    path.write_text(json.dumps(recs))
    had, good3, _, key3 = check(model, path, cache_dir)
    assert had == 0 and key3 != key and good3[0][0] != good[0][0]
    # a damaged entry is recomputed and rewritten, never trusted
    key3.write_text('{"format": 1, "records": {"0": ')
    had, good4, _, _ = check(model, path, cache_dir)
    assert had == 0 and good4 == good3 and json.loads(key3.read_text())["format"] == 1


def test_fingerprint_is_stable_across_calls_and_sees_the_template(tiny_toy_world):
    tok = build_model(load_recipe("mlp_patch")).tokenizer
    before = tokenizer_fingerprint(tok)
    tok("some text", add_special_tokens=False, truncation=True, max_length=4)  # sets per-call state in the backend
    assert tokenizer_fingerprint(tok) == before
    tok.chat_template = (tok.chat_template or "") + "{# edited #}"
    assert tokenizer_fingerprint(tok) != before
