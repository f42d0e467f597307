"""The shapes world's scenes: its vocabulary (shapes, colours, cell names, relations, question types), objects,
captions, the split a scene belongs to, and scene sampling. ``vlkit.data.toy`` generates the data set from them."""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass

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


def object_token(colour: str, shape: str) -> str:
    """The one-token name of an object kind in toy-lm's vocabulary ('<obj_red_circle>'): an image token carries a
    whole cell in one vector, so toy-lm also learns to read a cell written as one token (issue 26)."""
    return f"<obj_{colour}_{shape}>"


OBJECT_TOKENS = tuple(object_token(c, s) for c in COLOURS_LIST for s in SHAPES)
_OBJECT_IN_CAPTION = re.compile(r": (" + "|".join(COLOURS_LIST) + r") (" + "|".join(SHAPES) + r")(?=,|$)")


def object_token_caption(caption_text: str) -> str:
    """A canonical caption with every object written as its one token: 'north: red circle, west: nothing' ->
    'north: <obj_red_circle>, west: nothing'."""
    return _OBJECT_IN_CAPTION.sub(lambda m: ": " + object_token(m.group(1), m.group(2)), caption_text)


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
