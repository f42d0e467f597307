"""The procedural shapes world: determinism, disjoint splits, valid LLaVA records, answers that match scenes."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vlkit.data import toy

SIZES = dict(n_train=240, n_val=96, n_test=48)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy_data")
    toy.generate_toy_data(out, seed=3, **SIZES)
    return out


def _load(d: Path, name: str) -> list[dict]:
    return json.loads((d / f"{name}.json").read_text())


def test_same_seed_same_files(data_dir, tmp_path):
    toy.generate_toy_data(tmp_path, seed=3, **SIZES)
    for split in toy.SPLITS:
        for name in ("align", "instruct", "scenes"):
            assert (tmp_path / f"{name}_{split}.json").read_bytes() == (data_dir / f"{name}_{split}.json").read_bytes()
    for img in ("train/train_000000.png", "val/val_000005.png", "test/test_000047.png"):
        assert (tmp_path / "images" / img).read_bytes() == (data_dir / "images" / img).read_bytes()


def test_other_seed_other_scenes(data_dir, tmp_path):
    toy.generate_toy_data(tmp_path, seed=4, n_train=20, n_val=8, n_test=8)
    a = [s["caption"] for s in _load(tmp_path, "scenes_train")]
    b = [s["caption"] for s in _load(data_dir, "scenes_train")[:20]]
    assert a != b


def test_sample_is_order_independent(data_dir, tmp_path):
    """Scene i depends only on (seed, split, i): a shorter run yields the same first scenes."""
    toy.generate_toy_data(tmp_path, seed=3, n_train=10, n_val=8, n_test=8)
    assert _load(tmp_path, "scenes_train") == _load(data_dir, "scenes_train")[:10]

    def questions(recs):  # the blind reference depends on the training answers, so on n_train
        return [{k: v for k, v in r.items() if k != "references"} for r in recs]

    assert questions(_load(tmp_path, "instruct_val")) == questions(_load(data_dir, "instruct_val")[:8])


def test_splits_disjoint(data_dir):
    captions = {s: {r["caption"] for r in _load(data_dir, f"scenes_{s}")} for s in toy.SPLITS}
    assert not captions["train"] & captions["val"]
    assert not captions["train"] & captions["test"]
    assert not captions["val"] & captions["test"]
    for split in toy.SPLITS:
        assert all(toy.split_of(c) == split for c in captions[split])


def _check_llava(rec: dict, images_root: Path) -> None:
    assert set(rec) >= {"id", "image", "conversations"}
    conv = rec["conversations"]
    assert len(conv) >= 2 and len(conv) % 2 == 0
    assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
    assert conv[0]["value"].startswith("<image>\n")
    assert sum(t["value"].count("<image>") for t in conv) == 1
    assert all(t["value"].strip() for t in conv)
    assert (images_root / rec["image"]).is_file()


def test_records_are_valid_llava(data_dir):
    meta = json.loads((data_dir / "meta.json").read_text())
    images_root = data_dir / meta["images_root"]
    for split in toy.SPLITS:
        for name in ("align", "instruct"):
            records = _load(data_dir, f"{name}_{split}")
            assert len(records) == SIZES[f"n_{split}"]
            assert len({r["id"] for r in records}) == len(records)
            for rec in records:
                _check_llava(rec, images_root)
    with Image.open(images_root / "train" / "train_000000.png") as im:
        assert im.mode == "RGB" and im.size == (64, 64)


def test_instruct_types(data_dir):
    val = _load(data_dir, "instruct_val")
    counts = Counter(r["question_type"] for r in val)
    assert set(counts) == set(toy.QUESTION_TYPES)
    assert len(set(counts.values())) == 1  # balanced
    assert all(len(r["conversations"]) == 2 and r["answer"] == r["conversations"][1]["value"] for r in val)
    train = _load(data_dir, "instruct_train")
    multi = [r for r in train if r["question_type"] == "multi"]
    assert multi and len(multi) < len(train)
    for r in multi:
        assert len(r["question_types"]) == len(r["conversations"]) // 2 >= 2
    existence = Counter(r["answer"] for r in val if r["question_type"] == "existence")
    assert existence["yes"] > 0 and existence["no"] > 0


def _answer(question: str, objects: list[dict]) -> str:
    """An independent re-derivation of the canonical answer from the scene annotation."""
    q = question.replace("<image>\n", "")
    by_pos = {o["position"]: o for o in objects}
    names = {f"{o['colour']} {o['shape']}": o for o in objects}
    if q.startswith("What colour is the object in the "):
        return by_pos[q[len("What colour is the object in the "):-1]]["colour"]
    if q.startswith("What shape is the object in the "):
        return by_pos[q[len("What shape is the object in the "):-1]]["shape"]
    if q.startswith("Where is the "):
        return names[q[len("Where is the "):-1]]["position"]
    if q.startswith("What is "):
        for rel, (dr, dc) in toy.RELATIONS.items():
            if q.startswith(f"What is {rel} the "):
                o = names[q[len(f"What is {rel} the "):-1]]
                hit = [p for p in objects if (p["row"], p["col"]) == (o["row"] + dr, o["col"] + dc)]
                return f"{hit[0]['colour']} {hit[0]['shape']}" if hit else "nothing"
    if q == "How many objects are there?":
        return str(len(objects))
    if q.startswith("How many "):
        word = q[len("How many "):-len(" are there?")]
        if word.endswith(" objects"):
            return str(sum(o["colour"] == word[:-len(" objects")] for o in objects))
        return str(sum(toy.plural(o["shape"]) == word for o in objects))
    if q.startswith("Is there "):
        name = q[len("Is there "):-1].split(" ", 1)[1]
        return "yes" if name in names else "no"
    if q.startswith("What shape is the "):
        colour = q[len("What shape is the "):-len(" object?")]
        hits = [o for o in objects if o["colour"] == colour]
        assert len(hits) == 1, "shape_of_colour asked about a colour that is not unique"
        return hits[0]["shape"]
    raise AssertionError(f"unrecognised question {q!r}")


def test_answers_match_scenes(data_dir):
    for split in toy.SPLITS:
        scenes = {s["id"]: s for s in _load(data_dir, f"scenes_{split}")}
        for rec in _load(data_dir, f"instruct_{split}"):
            objects = scenes[rec["id"]]["objects"]
            conv = rec["conversations"]
            for q, a in zip(conv[::2], conv[1::2]):
                assert _answer(q["value"], objects) == a["value"], (rec["id"], q["value"])


def test_captions_match_scenes(data_dir):
    for split in toy.SPLITS:
        scenes = {s["id"]: s for s in _load(data_dir, f"scenes_{split}")}
        for rec in _load(data_dir, f"align_{split}"):
            objects = scenes[rec["id"]]["objects"]
            cap = rec["conversations"][1]["value"]
            assert cap == scenes[rec["id"]]["caption"]
            order = sorted(objects, key=lambda o: (o["row"], o["col"]))
            assert objects == order  # canonical row-major order
            # every cell, row-major, with its object or "nothing"
            cells = [part.split(": ") for part in cap.split(", ")]
            assert [c[0] for c in cells] == [toy.position_name(r, c, 3) for r in range(3) for c in range(3)]
            held = {o["position"]: f"{o['colour']} {o['shape']}" for o in objects}
            assert {c[0]: c[1] for c in cells} == {c[0]: held.get(c[0], toy.NOTHING) for c in cells}
            assert 1 <= len(objects) <= 4
            assert len({(o["row"], o["col"]) for o in objects}) == len(objects)


def test_pixels_show_the_objects(data_dir):
    """The centre pixel of every object's cell has the object's colour (sizes are >= 55% of the cell)."""
    meta = json.loads((data_dir / "meta.json").read_text())
    cell = meta["image_size"] / meta["grid"]
    for s in _load(data_dir, "scenes_val")[:30]:
        with Image.open(data_dir / "images" / s["image"]) as im:
            px = im.load()
            for o in s["objects"]:
                # sample a little below the centre: triangles are thin at the top
                x, y = int((o["col"] + 0.5) * cell), int((o["row"] + 0.55) * cell)
                colours = {px[x + dx, y + dy] for dx in (-1, 0, 1) for dy in (-1, 0, 1)}
                assert tuple(meta["colours"][o["colour"]]) in colours, (s["id"], o)


def test_position_names():
    assert [toy.position_name(r, c, 3) for r in range(3) for c in range(3)] == [
        "top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right"]
    assert toy.position_name(0, 1, 4) == "row 1 column 2"


def test_other_grid(tmp_path):
    toy.generate_toy_data(tmp_path, n_train=16, n_val=8, n_test=8, grid=4, max_objects=5, image_size=48)
    scenes = _load(tmp_path, "scenes_train")
    assert any("row" in o["position"] for s in scenes for o in s["objects"])
    with Image.open(tmp_path / "images" / scenes[0]["image"]) as im:
        assert im.size == (48, 48)
    with pytest.raises(ValueError, match="max_objects"):
        toy.generate_toy_data(tmp_path / "bad", n_train=1, n_val=0, n_test=0, grid=2, max_objects=5)


# ---- the position-blind reader --------------------------------------------------------------------------------
def _objs(*specs):
    """('red circle', row, col), ... -> Obj list."""
    return [toy.Obj(name.split()[1], name.split()[0], r, c, 0.7, 0, 0) for name, r, c in specs]


SCENE = _objs(("red circle", 0, 0), ("red square", 0, 1), ("blue circle", 1, 1), ("green cross", 2, 2))


def test_position_blind_reader_exact_on_a_hand_made_scene():
    from fractions import Fraction as F

    occupied, any_cell = toy.QuestionRules(), toy.QuestionRules("any", "uniform")
    q = "What colour is the object in the top left?"
    # cells="occupied": the colour of a random object of the scene: red 2/4, blue 1/4, green 1/4
    d = toy.position_blind_answers("colour_at_position", q, "red", SCENE, 3, occupied)
    assert d == {"red": F(1, 2), "blue": F(1, 4), "green": F(1, 4)}
    assert toy.position_blind_accuracy(d, "red") == 1 and toy.position_blind_accuracy(d, "blue") == 0
    # cells="any": "nothing" 5/9 beats every colour
    d = toy.position_blind_answers("colour_at_position", q, "red", SCENE, 3, any_cell)
    assert d == {"nothing": F(5, 9), "red": F(2, 9), "blue": F(1, 9), "green": F(1, 9)}
    assert toy.position_blind_accuracy(d, "red") == 0 and toy.position_blind_accuracy(d, "nothing") == 1
    # shapes: circle 2, square 1, cross 1
    d = toy.position_blind_answers("shape_at_position", "What shape is the object in the centre?", "circle",
                                   SCENE, 3, occupied)
    assert d == {"circle": F(1, 2), "square": F(1, 4), "cross": F(1, 4)}
    # position of an object: nine equally likely cells, the guess is right 1/9 of the time
    d = toy.position_blind_answers("position_of_object", "Where is the green cross?", "bottom right", SCENE, 3)
    assert len(d) == 9 and set(d.values()) == {F(1, 9)}
    assert toy.position_blind_accuracy(d, "bottom right") == F(1, 9)
    # relation: the neighbour is empty with (9-4)/8, each of the 3 other objects 1/8
    d = toy.position_blind_answers("relation", "What is right of the red circle?", "red square", SCENE, 3)
    assert d == {"nothing": F(5, 8), "red square": F(1, 8), "blue circle": F(1, 8), "green cross": F(1, 8)}
    assert toy.position_blind_accuracy(d, "red square") == 0
    # ties are split: two colours twice each and "nothing" 1/9 in an eight-object scene
    dense = _objs(("red circle", 0, 0), ("red square", 0, 1), ("blue circle", 0, 2), ("blue cross", 1, 0),
                  ("green square", 1, 1), ("yellow cross", 1, 2), ("purple diamond", 2, 0),
                  ("orange triangle", 2, 1))
    d = toy.position_blind_answers("colour_at_position", q, "red", dense, 3, any_cell)
    assert d["red"] == d["blue"] == F(2, 9) and d["nothing"] == F(1, 9)
    assert toy.position_blind_accuracy(d, "red") == F(1, 2)
    # position-free types: the reader knows the answer
    assert toy.position_blind_answers("count", "How many objects are there?", "4", SCENE, 3) == {"4": 1}


def test_position_blind_reader_refuses_a_question_of_another_form():
    with pytest.raises(ValueError, match="does not have the world's form"):
        toy.position_blind_answers("relation", "Which object is next to the red circle?", "nothing", SCENE, 3)


def test_held_out_questions_carry_their_references(data_dir):
    """blind = the type's most frequent training answer, uniform = 1 / distinct training answers, position_blind =
    the reader on the record's own scene; spatial types marked."""
    train = _load(data_dir, "instruct_train")
    answers: dict[str, Counter] = {}
    for rec in train:
        types = rec.get("question_types") or [rec["question_type"]]
        for t, turn in zip(types, rec["conversations"][1::2]):
            answers.setdefault(t, Counter())[turn["value"]] += 1
    scenes = {s["id"]: s for s in _load(data_dir, "scenes_val")}
    for rec in _load(data_dir, "instruct_val"):
        t, refs = rec["question_type"], rec["references"]
        assert rec["spatial"] == (t in toy.SPATIAL_TYPES)
        assert refs["blind"] == float(rec["answer"] == answers[t].most_common(1)[0][0])
        assert refs["uniform"] == pytest.approx(1 / len(answers[t]))
        objs = [toy.Obj(o["shape"], o["colour"], o["row"], o["col"], o["size"], 0, 0)
                for o in scenes[rec["id"]]["objects"]]
        q = rec["conversations"][0]["value"].replace("<image>\n", "")
        reader = toy.position_blind_accuracy(toy.position_blind_answers(t, q, rec["answer"], objs, 3), rec["answer"])
        assert refs["position_blind"] == pytest.approx(float(reader))


def test_a_world_where_position_matters(tmp_path):
    """The v4 rules: 6-8 objects, each colour and shape at most twice, cell questions about any cell, relations
    asked independently of the answer; the position-blind reader stays low on every spatial type."""
    toy.generate_toy_data(tmp_path, n_train=200, n_val=400, n_test=8, seed=0, min_objects=6, max_objects=8,
                          max_repeat=2, cell_questions="any", relations="uniform")
    for s in _load(tmp_path, "scenes_val") + _load(tmp_path, "scenes_train"):
        assert 6 <= len(s["objects"]) <= 8
        assert max(Counter(o["colour"] for o in s["objects"]).values()) <= 2
        assert max(Counter(o["shape"] for o in s["objects"]).values()) <= 2
    val = _load(tmp_path, "instruct_val")
    reader: dict[str, list[float]] = {}
    for rec in val:
        reader.setdefault(rec["question_type"], []).append(rec["references"]["position_blind"])
    for t in toy.SPATIAL_TYPES:
        assert sum(reader[t]) / len(reader[t]) <= 0.35, t
    assert any(r["answer"] == toy.NOTHING for r in val if r["question_type"] == "colour_at_position")
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert (meta["min_objects"], meta["cell_questions"], meta["relations"]) == (6, "any", "uniform")
