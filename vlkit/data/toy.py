"""The shapes world: a procedural dataset in LLaVA JSON format.

Each image shows 1..``max_objects`` coloured shapes on a plain background, one per cell of a ``grid`` x ``grid``
grid. Every scene is drawn from its own ``numpy`` generator seeded by ``(seed, split, index)``, so any sample can
be regenerated alone and the output does not depend on worker order. Scenes are assigned to splits by a hash of
their canonical description, so no description occurs in two splits.

Output layout (``out_dir``)::

    images/<split>/<id>.png        RGB PNG, image_size x image_size
    align_<split>.json             captions, LLaVA pretrain format
    instruct_<split>.json          questions with short canonical answers, LLaVA instruct format
    scenes_<split>.json            per-image annotations: objects with shape/colour/row/col
    meta.json                      generation parameters and the world's vocabulary

Image paths inside the JSON files are relative to ``out_dir / "images"``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np

FORMAT_VERSION = 2  # 2: captions list every cell in a fixed order
RECORDS_VERSION = 2  # what the JSON records hold beyond the scenes (2: val/test questions carry references)
SPLITS = ("train", "val", "test")
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (45, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 210),
    "orange": (250, 145, 25),
}
COLOURS_LIST = tuple(COLOURS)
BACKGROUND = (30, 30, 30)
NOTHING = "nothing"  # an empty cell in captions, and the answer to a relation question about one
# the types whose answer depends on where objects are: a position-blind reader (below) cannot answer them
SPATIAL_TYPES = ("colour_at_position", "shape_at_position", "position_of_object", "relation")
QUESTION_TYPES = (
    "colour_at_position",
    "shape_at_position",
    "position_of_object",
    "relation",
    "count",
    "count_by_attribute",
    "existence",
    "shape_of_colour",
)
CAPTION_PROMPTS = (
    "Describe the image.",
    "What is in the picture?",
    "Describe the scene.",
    "List the objects in the image.",
)
# relation word -> (row offset, col offset) of the neighbouring cell asked about
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}
_PLURAL = {"cross": "crosses"}
# share of the canonical scene space held out for val and test (by hash of the description)
_HELD_OUT_PERCENT = {"val": (0, 5), "test": (5, 10)}


# one-word names of the 3x3 cells: every cell one token, none a prefix of another (with "words", "top" is a cell
# and the start of "top left", and "left" is a cell, part of two others and a relation word)
COMPASS = ("northwest", "north", "northeast", "west", "centre", "east", "southwest", "south", "southeast")
CELL_NAMES = ("words", "compass")


def position_name(row: int, col: int, grid: int, names: str = "words") -> str:
    """'top left' .. 'bottom right' on a 3x3 grid ('northwest' .. 'southeast' with ``names="compass"``),
    'row R column C' (1-based) otherwise."""
    if grid == 3 and names == "compass":
        return COMPASS[row * 3 + col]
    if grid == 3:
        vert = ("top", "", "bottom")[row]
        horiz = ("left", "", "right")[col]
        return " ".join(w for w in (vert, horiz) if w) or "centre"
    return f"row {row + 1} column {col + 1}"


def plural(shape: str) -> str:
    return _PLURAL.get(shape, shape + "s")


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    row: int
    col: int
    size: float  # fraction of the cell side
    dx: int  # pixel jitter of the centre
    dy: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def article(word: str) -> str:
    """'a' or 'an' for the word that follows."""
    return "an" if word[0] in "aeiou" else "a"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(objects: list[Obj], grid: int, names: str = "words") -> str:
    """Canonical caption: every cell in row-major order with what it holds ('top left: red circle, top: nothing,
    ...'). A fixed layout puts each cell at the same place in every caption, as a patch grid does for an image,
    so a small LM reads a cell's content by its place rather than by searching free text."""
    by_cell = {(o.row, o.col): o.name for o in objects}
    return ", ".join(f"{position_name(r, c, grid, names)}: {by_cell.get((r, c), NOTHING)}"
                     for r in range(grid) for c in range(grid))


def clip_caption(objects: list[Obj], rng: np.random.Generator | None = None) -> str:
    """Position-free caption ('a red circle and a blue square'), shuffled when ``rng`` is given."""
    names = [o.name for o in objects]
    if rng is not None:
        names = [names[i] for i in rng.permutation(len(names))]
    return _join([f"{article(n)} {n}" for n in names])


def split_of(description: str) -> str:
    """The split a canonical description belongs to (stable hash, independent of seed)."""
    bucket = int(hashlib.sha1(description.encode()).hexdigest()[:8], 16) % 100
    for split, (lo, hi) in _HELD_OUT_PERCENT.items():
        if lo <= bucket < hi:
            return split
    return "train"


def _rng(seed: int, split: str, index: int, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index, salt])


@dataclass(frozen=True)
class QuestionRules:
    """How a world asks its spatial questions.

    ``cells``: ``"occupied"`` asks colour/shape at the cell of an object; ``"any"`` asks about a cell drawn
    uniformly from the whole grid (answer "nothing" when it is empty). ``relations``: ``"balanced"`` draws about
    half of the relation questions among those whose answer is an object; ``"uniform"`` draws the object and then
    the direction uniformly among those that stay on the grid. ``"any"`` and ``"uniform"`` ask independently of
    where the other objects are, which makes ``position_blind_answers`` the exact Bayes answer of a reader that
    knows the objects but not their cells."""

    cells: str = "occupied"
    relations: str = "balanced"
    cell_names: str = "words"  # position_name's names, in questions, answers and captions

    def __post_init__(self):
        if self.cell_names not in CELL_NAMES:
            raise ValueError(f"question rules: cell_names must be one of {CELL_NAMES}, got {self.cell_names!r}")
        if self.cells not in ("occupied", "any"):
            raise ValueError(f"question rules: cells must be 'occupied' or 'any', got {self.cells!r}")
        if self.relations not in ("balanced", "uniform"):
            raise ValueError(f"question rules: relations must be 'balanced' or 'uniform', got {self.relations!r}")


def sample_scene(rng: np.random.Generator, grid: int, max_objects: int, size_jitter: bool = True,
                 n: int | None = None, min_objects: int = 1, max_repeat: int | None = None) -> list[Obj]:
    """``n`` (default: min_objects..max_objects at random) objects in distinct cells; (colour, shape) pairs are
    unique within a scene; a colour or a shape occurs at most ``max_repeat`` times (None: no limit)."""
    n = int(rng.integers(min_objects, max_objects + 1)) if n is None else n
    cells = sorted(rng.choice(grid * grid, size=n, replace=False).tolist())
    pairs: set[tuple[str, str]] = set()
    colours, shapes = Counter(), Counter()
    objs = []
    for cell in cells:
        while True:
            pair = (COLOURS_LIST[int(rng.integers(len(COLOURS_LIST)))], SHAPES[int(rng.integers(len(SHAPES)))])
            if pair not in pairs and (max_repeat is None or max(colours[pair[0]], shapes[pair[1]]) < max_repeat):
                break
        pairs.add(pair)
        colours[pair[0]] += 1
        shapes[pair[1]] += 1
        size = float(rng.uniform(0.55, 0.8)) if size_jitter else 0.7
        dx, dy = (int(v) for v in rng.integers(-2, 3, size=2)) if size_jitter else (0, 0)
        objs.append(Obj(pair[1], pair[0], cell // grid, cell % grid, round(size, 3), dx, dy))
    return objs



# ---- questions ----------------------------------------------------------------------------------------------
def ask(qtype: str, objs: list[Obj], grid: int, rng: np.random.Generator,
        want_object: bool | None = None, rules: QuestionRules = QuestionRules()) -> tuple[str, str] | None:
    """(question, answer) of one type about a scene, or None when the type does not apply.

    ``want_object`` forces a relation question whose answer is an object (True) or "nothing" (False) (balanced
    relations only)."""
    pick = objs[int(rng.integers(len(objs)))]
    pos = position_name(pick.row, pick.col, grid, rules.cell_names)
    if rules.cells == "any" and qtype in ("colour_at_position", "shape_at_position"):
        cell = int(rng.integers(grid * grid))
        by_cell = {(o.row, o.col): o for o in objs}
        there = by_cell.get(divmod(cell, grid))
        attr = "colour" if qtype == "colour_at_position" else "shape"
        return (f"What {attr} is the object in the {position_name(*divmod(cell, grid), grid, rules.cell_names)}?",
                getattr(there, attr) if there else NOTHING)
    if rules.relations == "uniform" and qtype == "relation":
        by_cell = {(o.row, o.col): o for o in objs}
        valid = [rel for rel, (dr, dc) in RELATIONS.items()
                 if 0 <= pick.row + dr < grid and 0 <= pick.col + dc < grid]
        rel = valid[int(rng.integers(len(valid)))]
        other = by_cell.get((pick.row + RELATIONS[rel][0], pick.col + RELATIONS[rel][1]))
        return f"What is {rel} the {pick.name}?", other.name if other else NOTHING
    if qtype == "colour_at_position":
        return f"What colour is the object in the {pos}?", pick.colour
    if qtype == "shape_at_position":
        return f"What shape is the object in the {pos}?", pick.shape
    if qtype == "position_of_object":
        return f"Where is the {pick.name}?", pos
    if qtype == "relation":
        by_cell = {(o.row, o.col): o for o in objs}
        # about half of the questions have an object as answer, when the scene allows it
        options = [(o, rel) for o in objs for rel, (dr, dc) in RELATIONS.items()
                   if 0 <= o.row + dr < grid and 0 <= o.col + dc < grid]
        hits = [(o, rel) for o, rel in options if (o.row + RELATIONS[rel][0], o.col + RELATIONS[rel][1]) in by_cell]
        if want_object is None:
            pool = hits if hits and rng.random() < 0.5 else options
        else:
            pool = hits if want_object else [h for h in options if h not in hits]
        if not pool:
            return None
        o, rel = pool[int(rng.integers(len(pool)))]
        dr, dc = RELATIONS[rel]
        other = by_cell.get((o.row + dr, o.col + dc))
        return f"What is {rel} the {o.name}?", other.name if other else NOTHING
    if qtype == "count":
        return "How many objects are there?", str(len(objs))
    if qtype == "count_by_attribute":
        if rng.random() < 0.5:
            colour = COLOURS_LIST[int(rng.integers(len(COLOURS_LIST)))] if rng.random() < 0.3 else pick.colour
            return f"How many {colour} objects are there?", str(sum(o.colour == colour for o in objs))
        shape = SHAPES[int(rng.integers(len(SHAPES)))] if rng.random() < 0.3 else pick.shape
        return f"How many {plural(shape)} are there?", str(sum(o.shape == shape for o in objs))
    if qtype == "existence":
        present = {(o.colour, o.shape) for o in objs}
        if rng.random() < 0.5:
            return f"Is there {article(pick.colour)} {pick.name}?", "yes"
        # "no" questions: half of them share the colour or the shape of an object in the scene
        for _ in range(50):
            if rng.random() < 0.5:
                c, s = (pick.colour, SHAPES[int(rng.integers(len(SHAPES)))]) if rng.random() < 0.5 else (
                    COLOURS_LIST[int(rng.integers(len(COLOURS_LIST)))], pick.shape)
            else:
                c, s = COLOURS_LIST[int(rng.integers(len(COLOURS_LIST)))], SHAPES[int(rng.integers(len(SHAPES)))]
            if (c, s) not in present:
                return f"Is there {article(c)} {c} {s}?", "no"
        return None
    if qtype == "shape_of_colour":
        counts = Counter(o.colour for o in objs)
        unique = [o for o in objs if counts[o.colour] == 1]
        if not unique:
            return None
        o = unique[int(rng.integers(len(unique)))]
        return f"What shape is the {o.colour} object?", o.shape
    raise ValueError(f"unknown question type {qtype!r}; valid: {', '.join(QUESTION_TYPES)}")


# ---- the position-blind reader --------------------------------------------------------------------------------
_QUESTION_FORMS = {
    "colour_at_position": re.compile(r"What colour is the object in the (?P<pos>[a-z0-9 ]+)\?"),
    "shape_at_position": re.compile(r"What shape is the object in the (?P<pos>[a-z0-9 ]+)\?"),
    "position_of_object": re.compile(r"Where is the (?P<colour>\w+) (?P<shape>\w+)\?"),
    "relation": re.compile(r"What is (?P<rel>left of|right of|above|below) the (?P<colour>\w+) (?P<shape>\w+)\?"),
}


def position_blind_answers(qtype: str, question: str, answer: str, objs: list[Obj], grid: int,
                           rules: QuestionRules = QuestionRules()) -> dict[str, Fraction]:
    """The answers of a *position-blind reader* and their probabilities: a reader that knows every object of the
    scene (colour and shape) but not its cell, and takes every placement of those objects on distinct cells as
    equally likely (among the placements where the question can be asked). It is what a perfect pooled
    image token could know. Exact (fractions), from the question's own words.

    - colour/shape at a cell: with ``cells="occupied"`` the attribute of a random object of the scene; with
      ``"any"``, "nothing" with probability (G - n) / G and each object's attribute with 1 / G (G cells).
    - position of an object: every cell 1 / G.
    - relation: the neighbour is each other object with 1 / (G - 1), empty with (G - n) / (G - 1).
    - the other types are functions of the objects alone: the true answer with probability 1.
    Under rules ``any``/``uniform`` the questions are asked independently of the placement, so this is the
    exact posterior; under the older ``balanced`` relations it is the uniform-placement reader (CLEVR's
    re-answer-under-permutation test)."""
    n, cells = len(objs), grid * grid
    form = _QUESTION_FORMS.get(qtype)
    if form is None:  # count, count_by_attribute, existence, shape_of_colour: no position needed
        return {answer: Fraction(1)}
    m = form.fullmatch(question)
    if m is None:
        raise ValueError(f"position-blind reader: {qtype} question {question!r} does not have the world's form")
    dist: Counter = Counter()
    if qtype in ("colour_at_position", "shape_at_position"):
        attr = "colour" if qtype == "colour_at_position" else "shape"
        if rules.cells == "any":
            dist[NOTHING] += Fraction(cells - n, cells)
            for o in objs:
                dist[getattr(o, attr)] += Fraction(1, cells)
        else:
            for o in objs:
                dist[getattr(o, attr)] += Fraction(1, n)
    elif qtype == "position_of_object":
        for r in range(grid):
            for c in range(grid):
                dist[position_name(r, c, grid, rules.cell_names)] += Fraction(1, cells)
    else:  # relation
        named = f"{m['colour']} {m['shape']}"
        dist[NOTHING] += Fraction(cells - n, cells - 1)
        for o in objs:
            if o.name != named:
                dist[o.name] += Fraction(1, cells - 1)
    return {k: v for k, v in dist.items() if v}


def position_blind_accuracy(dist: dict[str, Fraction], answer: str) -> Fraction:
    """Expected accuracy of the reader's best guess: the true answer's share of the most likely answers (ties
    split evenly)."""
    top = max(dist.values())
    modes = [a for a, p in dist.items() if p == top]
    return Fraction(int(answer in modes), len(modes))


# ---- drawing ------------------------------------------------------------------------------------------------
def render(objs: list[Obj], image_size: int, grid: int):
    """A PIL RGB image of the scene."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = image_size / grid
    for o in objs:
        cx = (o.col + 0.5) * cell + o.dx
        cy = (o.row + 0.5) * cell + o.dy
        r = o.size * cell / 2
        fill = COLOURS[o.colour]
        box = [cx - r, cy - r, cx + r, cy + r]
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            s = r * 0.85
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
        elif o.shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        elif o.shape == "cross":
            t = r * 0.35
            draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
            draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
        else:
            raise ValueError(f"unknown shape {o.shape!r}")
    return img


def _render_batch(args: tuple[list[tuple[str, list[Obj]]], int, int]) -> int:
    jobs, image_size, grid = args
    for path, objs in jobs:
        render(objs, image_size, grid).save(path, format="PNG", optimize=False, compress_level=6)
    return len(jobs)


# ---- generation ---------------------------------------------------------------------------------------------
def _scene_for(seed: int, split: str, index: int, grid: int, max_objects: int, size_jitter: bool,
               qtype: str | None, min_objects: int = 1, rules: QuestionRules = QuestionRules(),
               max_repeat: int | None = None) -> tuple[list[Obj], np.random.Generator, tuple[str, str] | None]:
    """The scene at (split, index): rejection-sampled until its description hashes into ``split`` and, for a
    fixed ``qtype``, until that question applies. The object count is drawn first, so every split has the same
    distribution of object counts."""
    rng = _rng(seed, split, index)
    n = int(rng.integers(min_objects, max_objects + 1))
    # held-out balanced relation questions alternate between an object answer and "nothing"
    want = (n > 1 and (index // len(QUESTION_TYPES)) % 3 != 0
            if qtype == "relation" and rules.relations == "balanced" else None)
    for _ in range(100_000):
        objs = sample_scene(rng, grid, max_objects, size_jitter, n=n, max_repeat=max_repeat)
        if split_of(caption(objs, grid, rules.cell_names)) != split:
            continue
        if qtype is None:
            return objs, rng, None
        qa = ask(qtype, objs, grid, rng, want_object=want, rules=rules)
        if qa is not None:
            return objs, rng, qa
    raise RuntimeError(f"could not sample a {split} scene for {qtype}; the grid is too small for this split")


def _instruct_train(objs: list[Obj], grid: int, rng: np.random.Generator, multi_share: float,
                    rules: QuestionRules = QuestionRules()):
    """1 turn, or 2-3 turns of distinct question types."""
    n_turns = int(rng.integers(2, 4)) if rng.random() < multi_share else 1
    turns: list[tuple[str, str, str]] = []
    order = rng.permutation(len(QUESTION_TYPES))
    for i in order:
        qa = ask(QUESTION_TYPES[i], objs, grid, rng, rules=rules)
        if qa is not None:
            turns.append((QUESTION_TYPES[i], *qa))
        if len(turns) == n_turns:
            break
    return turns


def _references(qtype: str, question: str, answer: str, objs: list[Obj], grid: int, rules: QuestionRules,
                train_answers: dict[str, Counter]) -> dict[str, float]:
    """What three references score on one held-out question: ``blind`` (the type's most frequent training answer),
    ``uniform`` (a uniform guess among the type's distinct training answers), ``position_blind`` (the
    position-blind reader's expected accuracy)."""
    seen = train_answers.get(qtype) or Counter()
    top = seen.most_common(1)[0][0] if seen else None
    reader = position_blind_accuracy(position_blind_answers(qtype, question, answer, objs, grid, rules), answer)
    return {"blind": float(answer == top), "uniform": 1 / len(seen) if seen else 0.0,
            "position_blind": float(reader)}


def _conversation(turns: list[tuple[str, str, str]]) -> list[dict[str, str]]:
    conv = []
    for k, (_, q, a) in enumerate(turns):
        conv.append({"from": "human", "value": f"<image>\n{q}" if k == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return conv


def generate_toy_data(
    out_dir: str | os.PathLike,
    *,
    n_train: int = 20000,
    n_val: int = 1000,
    n_test: int = 1000,
    image_size: int = 64,
    grid: int = 3,
    max_objects: int = 4,
    seed: int = 0,
    size_jitter: bool = True,
    multi_turn_share: float = 0.5,
    min_objects: int = 1,
    max_repeat: int | None = None,
    cell_questions: str = "occupied",
    relations: str = "balanced",
    cell_names: str = "words",
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Path]:
    """Write the shapes world into ``out_dir``; returns the written files by name.

    ``progress(done, total)`` is called as images are written. Keys of the result: ``images``, ``meta``,
    ``align_<split>``, ``instruct_<split>``, ``scenes_<split>``. Scenes hold ``min_objects..max_objects``
    objects, no colour or shape more than ``max_repeat`` times; ``cell_questions`` and ``relations`` are the ``QuestionRules``. Every val/test question carries
    ``spatial`` (its type needs positions) and ``references``: what the blind answer (the type's most frequent
    training answer), a uniform guess among the type's training answers and the position-blind reader score on
    it.
    """
    if not 1 <= min_objects <= max_objects <= grid * grid:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {grid * grid} for a {grid}x{grid} grid, "
                         f"got min_objects={min_objects}, max_objects={max_objects}")
    rules = QuestionRules(cell_questions, relations, cell_names)
    train_answers: dict[str, Counter] = {}
    out = Path(out_dir)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    paths: dict[str, Path] = {"images": out / "images", "meta": out / "meta.json"}
    jobs: list[tuple[str, list[Obj]]] = []
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        align, instruct, scenes = [], [], []
        for i in range(counts[split]):
            sid = f"{split}_{i:06d}"
            image = f"{split}/{sid}.png"
            qtype = None if split == "train" else QUESTION_TYPES[i % len(QUESTION_TYPES)]
            objs, rng, qa = _scene_for(seed, split, i, grid, max_objects, size_jitter, qtype, min_objects, rules,
                                       max_repeat)
            cap = caption(objs, grid, cell_names)
            prompt = CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))]
            align.append({"id": sid, "image": image, "conversations": [
                {"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": cap}]})
            if split == "train":
                turns = _instruct_train(objs, grid, rng, multi_turn_share, rules)
                for t, _, a in turns:
                    train_answers.setdefault(t, Counter())[a] += 1
            else:
                turns = [(qtype, *qa)]
            rec = {"id": sid, "image": image, "conversations": _conversation(turns)}
            if len(turns) == 1:
                rec["question_type"] = turns[0][0]
                rec["answer"] = turns[0][2]
            else:
                rec["question_type"] = "multi"
                rec["question_types"] = [t[0] for t in turns]
            if split != "train":
                rec["spatial"] = qtype in SPATIAL_TYPES
                rec["references"] = _references(qtype, *qa, objs, grid, rules, train_answers)
            instruct.append(rec)
            scenes.append({"id": sid, "image": image, "caption": cap, "objects": [
                {"shape": o.shape, "colour": o.colour, "row": o.row, "col": o.col,
                 "position": position_name(o.row, o.col, grid, cell_names), "size": o.size} for o in objs]})
            jobs.append((str(out / "images" / image), objs))
        for name, records in (("align", align), ("instruct", instruct), ("scenes", scenes)):
            p = out / f"{name}_{split}.json"
            p.write_text(json.dumps(records, indent=None, separators=(",", ":")))
            paths[f"{name}_{split}"] = p

    meta = {
        "format_version": FORMAT_VERSION, "seed": seed, "image_size": image_size, "grid": grid,
        "min_objects": min_objects, "max_objects": max_objects, "max_repeat": max_repeat, "size_jitter": size_jitter,
        "multi_turn_share": multi_turn_share, "cell_questions": cell_questions, "relations": relations,
        "cell_names": cell_names,
        "spatial_types": list(SPATIAL_TYPES),
        "counts": counts, "shapes": list(SHAPES), "colours": {k: list(v) for k, v in COLOURS.items()},
        "background": list(BACKGROUND), "question_types": list(QUESTION_TYPES),
        "positions": [position_name(r, c, grid, cell_names) for r in range(grid) for c in range(grid)],
        "caption_prompts": list(CAPTION_PROMPTS), "images_root": "images",
    }
    paths["meta"].write_text(json.dumps(meta, indent=2))

    total = len(jobs)
    chunk = 250
    batches = [(jobs[k:k + chunk], image_size, grid) for k in range(0, total, chunk)]
    workers = workers if workers is not None else min(os.cpu_count() or 1, 4)
    done = 0
    if workers > 1 and total > 2000:
        with ProcessPoolExecutor(workers) as pool:
            for n in pool.map(_render_batch, batches):
                done += n
                if progress:
                    progress(done, total)
    else:
        for b in batches:
            done += _render_batch(b)
            if progress:
                progress(done, total)
    return paths


def load_scenes(data_dir: str | os.PathLike, split: str) -> list[dict]:
    """The per-image annotations of one split."""
    return json.loads((Path(data_dir) / f"scenes_{split}.json").read_text())
