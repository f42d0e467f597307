"""Pairing a study's runs by seed: one table, read by the Findings and by the report's tables alike.

Two runs pair when they differ only in the compared axis: the same seed and the same values of every other axis.
A cell comparison (``axis`` names several axes, vlkit/ablate/expect.py) compares two settings of those axes: its
arms are labelled ``a=x,b=y`` and its runs pair by seed within each setting of the axes it does not name.
A run counts when it finished and its metric cell is a number (:func:`vlkit.ablate.stats.number`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

from vlkit.ablate.expect import cell_axes, cell_label
from vlkit.ablate.grid import show_value
from vlkit.ablate.stats import number

PairKey = tuple[str, ...]  # the other axes' values, then the seed, as results.csv shows them


def _arm_and_key(r: dict[str, Any], axes: list[str], axis: str) -> tuple[str, PairKey]:
    """A result row's arm on ``axis`` (a value, or a cell's label) and its pair key (the other axes, the seed)."""
    named = cell_axes(axis)
    arm = cell_label(axis, {x: show_value(r.get(x)) for x in named})
    return arm, tuple(show_value(r.get(x)) for x in axes if x not in named) + (str(r.get("seed")),)


def arm_table(rows: list[dict[str, Any]], axes: list[str], axis: str, metric: str) -> dict[str, dict[PairKey, float]]:
    """Each arm of ``axis`` (its value as results.csv shows it) -> {pair key: the run's metric value}, in the rows'
    order. Two runs of one arm under one key (a repeated grid point): the later one counts."""
    table: dict[str, dict[PairKey, float]] = {}
    for r in rows:
        value = number(r.get(metric))
        if r.get("status") != "finished" or value is None:
            continue
        arm, key = _arm_and_key(r, axes, axis)
        table.setdefault(arm, {})[key] = value
    return table


def arms(rows: list[dict[str, Any]], axis: str) -> list[Any]:
    """The values of ``axis`` among the finished runs, in the order they first appear, as the rows hold them (a
    table's arm is ``show_value`` of one)."""
    return list(dict.fromkeys(r.get(axis) for r in rows if r.get("status") == "finished"))


def pairs(rows: list[dict[str, Any]], axes: list[str], axis: str, a: str, b: str,
          metric: str) -> tuple[list[float], list[float], int]:
    """Metric values of arm a and arm b, paired by seed within each setting of the other axes (in sorted key
    order); and the number of settings that gave a pair."""
    table = arm_table(rows, axes, axis, metric)
    xa, xb = table.get(a, {}), table.get(b, {})
    common = sorted(set(xa) & set(xb))
    return [xa[k] for k in common], [xb[k] for k in common], len({k[:-1] for k in common})


Answers = dict[str, dict[str, tuple[str, bool]]]  # run id -> {question id: (question type, correct)}


def question_pairs(rows: list[dict[str, Any]], answers: Answers, axes: list[str], axis: str, a: str, b: str,
                   metric: str) -> "np.ndarray | None":
    """The (pairs × questions) table of arm a's answer minus arm b's (1 correct, 0 not) on ``metric``'s questions
    (``accuracy``: every question; ``acc/<type>``: that type's), pairs as in :func:`pairs`, questions those every
    paired run answered, in sorted id order. None when the metric is not an accuracy or a paired run kept no
    answers (the analysis then stays at run level)."""
    import numpy as np

    if metric != "accuracy" and not metric.startswith("acc/"):
        return None
    qtype = metric.removeprefix("acc/") if metric != "accuracy" else None
    runs: dict[str, dict[PairKey, str]] = {}
    for r in rows:
        if r.get("status") == "finished" and number(r.get(metric)) is not None:
            arm, key = _arm_and_key(r, axes, axis)
            runs.setdefault(arm, {})[key] = str(r.get("run"))
    ra, rb = runs.get(a, {}), runs.get(b, {})
    common = sorted(set(ra) & set(rb))
    ids = [(ra[k], rb[k]) for k in common]
    if not ids or any(x not in answers for pair in ids for x in pair):
        return None
    sets = [{q for q, (t, _) in answers[x].items() if qtype is None or t == qtype} for pair in ids for x in pair]
    questions = sorted(set.intersection(*sets))
    if not questions:
        return None
    return np.array([[float(answers[x][q][1]) - float(answers[y][q][1]) for q in questions] for x, y in ids])
