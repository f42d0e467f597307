"""The shapes world's questions: ``ask`` draws a question of a type about a scene under a world's
``QuestionRules``, and the position-blind reader answers it knowing the objects but not their cells."""
from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction

import numpy as np

from vlkit.data.toy_scenes import (COLOURS_LIST, NOTHING, QUESTION_TYPES, RELATIONS, SHAPES, Obj, QuestionRules,
                                   article, plural,
                                   position_name)


# ---- questions ----------------------------------------------------------------------------------------------
def ask(qtype: str, objs: list[Obj], grid: int, rng: np.random.Generator,
        want_object: bool | None = None, rules: QuestionRules = QuestionRules()) -> tuple[str, str] | None:
    """(question, answer) of one type about a scene, or None when the type does not apply.

    ``want_object`` forces a relation question whose answer is an object (True) or "nothing" (False) (balanced
    relations only). The random draws are the same, in the same order, as the world's data always had."""
    pick = objs[int(rng.integers(len(objs)))]
    pos = position_name(pick.row, pick.col, grid, rules.cell_names)
    if rules.cells == "any" and qtype in ("colour_at_position", "shape_at_position"):
        return _ask_any_cell(qtype, objs, grid, rng, rules)
    if qtype == "colour_at_position":
        return f"What colour is the object in the {pos}?", pick.colour
    if qtype == "shape_at_position":
        return f"What shape is the object in the {pos}?", pick.shape
    if qtype == "position_of_object":
        return f"Where is the {pick.name}?", pos
    if qtype == "relation":
        if rules.relations == "uniform":
            return _ask_relation_uniform(pick, objs, grid, rng)
        return _ask_relation_balanced(objs, grid, rng, want_object)
    if qtype == "count":
        return "How many objects are there?", str(len(objs))
    if qtype == "count_by_attribute":
        return _ask_count_by_attribute(pick, objs, rng)
    if qtype == "existence":
        return _ask_existence(pick, objs, rng)
    if qtype == "shape_of_colour":
        counts = Counter(o.colour for o in objs)
        unique = [o for o in objs if counts[o.colour] == 1]
        if not unique:
            return None
        o = unique[int(rng.integers(len(unique)))]
        return f"What shape is the {o.colour} object?", o.shape
    raise ValueError(f"unknown question type {qtype!r}; valid: {', '.join(QUESTION_TYPES)}")


def _ask_any_cell(qtype: str, objs: list[Obj], grid: int, rng: np.random.Generator,
                  rules: QuestionRules) -> tuple[str, str]:
    """Colour or shape of a cell drawn from the whole grid ("nothing" when it is empty)."""
    cell = int(rng.integers(grid * grid))
    there = {(o.row, o.col): o for o in objs}.get(divmod(cell, grid))
    attr = "colour" if qtype == "colour_at_position" else "shape"
    return (f"What {attr} is the object in the {position_name(*divmod(cell, grid), grid, rules.cell_names)}?",
            getattr(there, attr) if there else NOTHING)


def _neighbour(o: Obj, rel: str, by_cell: dict) -> str:
    dr, dc = RELATIONS[rel]
    other = by_cell.get((o.row + dr, o.col + dc))
    return other.name if other else NOTHING


def _ask_relation_uniform(pick: Obj, objs: list[Obj], grid: int, rng: np.random.Generator) -> tuple[str, str]:
    """About ``pick``, in a direction drawn among those that stay on the grid."""
    valid = [rel for rel, (dr, dc) in RELATIONS.items() if 0 <= pick.row + dr < grid and 0 <= pick.col + dc < grid]
    rel = valid[int(rng.integers(len(valid)))]
    return f"What is {rel} the {pick.name}?", _neighbour(pick, rel, {(o.row, o.col): o for o in objs})


def _ask_relation_balanced(objs: list[Obj], grid: int, rng: np.random.Generator,
                           want_object: bool | None) -> tuple[str, str] | None:
    """About half of the questions have an object as answer, when the scene allows it."""
    by_cell = {(o.row, o.col): o for o in objs}
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
    return f"What is {rel} the {o.name}?", _neighbour(o, rel, by_cell)


def _ask_count_by_attribute(pick: Obj, objs: list[Obj], rng: np.random.Generator) -> tuple[str, str]:
    if rng.random() < 0.5:
        colour = COLOURS_LIST[int(rng.integers(len(COLOURS_LIST)))] if rng.random() < 0.3 else pick.colour
        return f"How many {colour} objects are there?", str(sum(o.colour == colour for o in objs))
    shape = SHAPES[int(rng.integers(len(SHAPES)))] if rng.random() < 0.3 else pick.shape
    return f"How many {plural(shape)} are there?", str(sum(o.shape == shape for o in objs))


def _ask_existence(pick: Obj, objs: list[Obj], rng: np.random.Generator) -> tuple[str, str] | None:
    """Yes or no, balanced; half of the "no" questions share the colour or the shape of an object present."""
    present = {(o.colour, o.shape) for o in objs}
    if rng.random() < 0.5:
        return f"Is there {article(pick.colour)} {pick.name}?", "yes"
    for _ in range(50):
        if rng.random() < 0.5:
            c, s = (pick.colour, SHAPES[int(rng.integers(len(SHAPES)))]) if rng.random() < 0.5 else (
                COLOURS_LIST[int(rng.integers(len(COLOURS_LIST)))], pick.shape)
        else:
            c, s = COLOURS_LIST[int(rng.integers(len(COLOURS_LIST)))], SHAPES[int(rng.integers(len(SHAPES)))]
        if (c, s) not in present:
            return f"Is there {article(c)} {c} {s}?", "no"
    return None


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
