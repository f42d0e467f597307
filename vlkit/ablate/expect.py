"""The ``expect:`` grammar of a study: parse each expectation, check it against the grid's axes and the metrics.

Grammar (one string per expectation; ``+-`` may stand for ``±``)::

    <a> > <b> on <metric>                   a beats b (the metric is higher for a)
    <a> < <b> on <metric>                   a is lower than b
    <a> ~ <b> on <metric> (±<margin>)       a and b are equivalent: their difference lies within ±margin
    <a> >= <b> on <metric> (±<margin>)      a is not worse than b by more than the margin (non-inferiority:
                                            a − b > −margin); ``<=``: a − b < +margin; ``≥`` / ``≤`` also read
    <metric> increases with <axis> [up to <value> [then flat (±<margin>)]]
    <metric> decreases with <axis> [up to <value> [then flat (±<margin>)]]

``<a>`` and ``<b>`` are two values of one grid axis (``patch``, ``cls``; write ``axis=value`` when a value belongs
to more than one axis), or two *cells* of a factorial grid, each a comma-separated setting of the same axes
(``projector=linear,num_image_tokens=16 > projector=mlp,num_image_tokens=4``: a linear projector on 16 tokens beats
an MLP on 4, MM1's "tokens matter more than the connector" as one planned contrast); cells pair by seed within each
setting of the axes they do not name. ``<metric>`` is a column of results.csv: ``accuracy``, ``val_loss``, ``final_loss``,
``bleu``, ``tokens_per_s``, ``wall_time_s`` or ``acc/<question_type>``. A trend's axis must have numeric values
(they are ordered numerically: 1, 4, 9, 16, 64).

This module knows no runs and no statistics: config.py checks a recipe's ``expect:`` with it when the recipe loads,
and vlkit/ablate/findings.py judges the expectations it returns.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any, Literal

from vlkit.ablate.grid import show_value
from vlkit.registry import suggest

PLAIN_METRICS = ("accuracy", "val_loss", "final_loss", "bleu", "tokens_per_s", "wall_time_s")

_VALUE = r"[^\s<>~≥≤()]+"
_COMPARISON = re.compile(rf"^(?P<a>{_VALUE})\s*(?P<op>>=|<=|[<>~≥≤])\s*(?P<b>{_VALUE})(?:\s+(?P<on>[^\s()]+)\s+(?P<metric>[^\s()]+))?"
                         r"(?:\s*\((?P<margin>[^)]*)\))?$")
_TREND = re.compile(r"^(?P<metric>[^\s()]+)\s+(?P<dir>\w+)\s+with\s+(?P<axis>\S+)"
                    r"(?:\s+up\s+to\s+(?P<knee>[^\s()]+))?(?:\s+then\s+(?P<flat>\w+)\s*(?:\((?P<margin>[^)]*)\))?)?$")
_REVERSED_OP = re.compile(r"=\s*[<>]|[<>]\s+=")  # "=>", "=<" and "> =": a non-inferiority mistyped
_MARGIN = re.compile(r"^(?:±|\+-|\+/-)\s*(?P<num>[0-9.eE+-]+)$")
GRAMMAR = ("write '<a> > <b> on <metric>', '<a> < <b> on <metric>', '<a> ~ <b> on <metric> (±margin)', "
           "'<a> >= <b> on <metric> (±margin)' (non-inferiority) or "
           "'<metric> increases|decreases with <axis> [up to <value> [then flat (±margin)]]'; <a> and <b> are values "
           "of one axis, or cells axis=value,axis=value")


MARGIN_OPS = ("~", ">=", "<=")  # the comparisons that need a margin
NONINFERIOR = {">=": 1, "<=": -1}  # non-inferiority: the side a − b must stay on, beyond −side·margin


class ExpectationError(ValueError):
    """One expectation that cannot be read or does not fit the grid; the message says why."""


@dataclass(frozen=True)
class Comparison:
    key: str  # expect[i]
    text: str
    metric: str
    op: Literal[">", "<", "~", ">=", "<="]
    a: str  # axis value as written (``axis=`` prefix removed once resolved; a cell: ``axis=value,axis=value``)
    b: str
    margin: float | None = None  # "~", ">=" and "<=" only
    axis: str | None = None  # filled by resolve(); a cell comparison: its axes joined by "," (CELL_SEP)


@dataclass(frozen=True)
class Trend:
    key: str
    text: str
    metric: str
    direction: Literal["increases", "decreases"]
    axis: str
    knee: str | None = None
    flat_margin: float | None = None
    values: tuple[str, ...] = ()  # the axis' values in numeric order, filled by resolve()


Expectation = Comparison | Trend


# ---- grammar ---------------------------------------------------------------------------------------------------
def parse_margin(text: str) -> float:
    """``±0.05`` / ``+-0.05`` -> 0.05; a positive, finite number."""
    m = _MARGIN.match(text.strip())
    if not m:
        raise ExpectationError(f"margin '({text})' is not of the form (±0.05) or (+-0.05)")
    try:
        value = float(m["num"])
    except ValueError:
        raise ExpectationError(f"margin '({text})': '{m['num']}' is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ExpectationError(f"margin '({text})' must be a positive number")
    return value


def parse_expectation(text: Any, key: str) -> Expectation:
    """One ``expect:`` entry -> a typed expectation (grammar only; :func:`resolve` checks it against the grid)."""
    if not isinstance(text, str):
        raise ExpectationError(f"an expectation is a string, got {type(text).__name__} {text!r}; {GRAMMAR}")
    s = " ".join(text.split())
    typo = _REVERSED_OP.search(s)
    if typo:
        op = "".join(typo[0].split())
        raise ExpectationError(f"'{s}': '{op}' is not an operator; did you mean '{op[::-1]}'? {GRAMMAR}"
                               if op in ("=>", "=<") else f"'{s}': write '{op}' without a space; {GRAMMAR}")
    m = _COMPARISON.match(s)
    if m:
        return _comparison(m, s, key)
    m = _TREND.match(s)
    if m:
        return _trend(m, s, key)
    raise ExpectationError(f"cannot read '{s}'; {GRAMMAR}")


def _comparison(m: re.Match[str], s: str, key: str) -> Comparison:
    if m["on"] is None:
        margin = f" ({m['margin']})" if m["margin"] else " (±0.05)" if m["op"] in (*MARGIN_OPS, "≥", "≤") else ""
        raise ExpectationError(f"'{s}' names no metric; write '{m['a']} {m['op']} {m['b']} on <metric>{margin}'")
    if m["on"] != "on":
        raise ExpectationError(f"'{s}': expected 'on <metric>' after '{m['a']} {m['op']} {m['b']}', got '{m['on']}'")
    op = {"≥": ">=", "≤": "<="}.get(m["op"], m["op"])
    margin = None
    if op in MARGIN_OPS:
        if m["margin"] is None:
            what = "an equivalence" if op == "~" else "a non-inferiority"
            raise ExpectationError(f"'{s}': {what} needs its margin, e.g. '{s} (±0.05)'")
        margin = parse_margin(m["margin"])
    elif m["margin"] is not None:
        raise ExpectationError(f"'{s}': a margin only applies to '~' (equivalence) and '>=' / '<=' "
                               f"(non-inferiority); remove '({m['margin']})' or use one of those")
    return Comparison(key, s, m["metric"], op, m["a"], m["b"], margin)  # type: ignore[arg-type]


def _trend(m: re.Match[str], s: str, key: str) -> Trend:
    direction = m["dir"]
    if direction not in ("increases", "decreases"):
        raise ExpectationError(f"'{s}': '{direction}' is not a trend.{suggest(direction, ['increases', 'decreases'])}"
                               " Valid: increases, decreases")
    margin = None
    if m["flat"] is not None:
        if m["flat"] != "flat":
            raise ExpectationError(f"'{s}': after 'then' write 'flat (±margin)', got '{m['flat']}'")
        if m["knee"] is None:
            raise ExpectationError(f"'{s}': 'then flat' needs a knee: '... up to <value> then flat (±margin)'")
        if m["margin"] is None:
            raise ExpectationError(f"'{s}': 'then flat' needs its margin, e.g. 'then flat (±0.05)'")
        margin = parse_margin(m["margin"])
    return Trend(key, s, m["metric"], direction, m["axis"], m["knee"], margin)  # type: ignore[arg-type]


# ---- checks against the grid and the metrics -------------------------------------------------------------------
def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_metric(metric: str, question_types: list[str] | None, columns: list[str] | None = None) -> None:
    """``metric`` is a metric the report has. With ``columns`` (the report's): one of them; else one of the known
    families, and for ``acc/<type>`` one of ``question_types`` when they are known (the toy world's)."""
    if columns is not None:
        if metric not in columns:
            if metric.startswith("acc/"):  # compare question types, not the shared 'acc/' prefix
                types = [c.removeprefix("acc/") for c in columns if c.startswith("acc/")]
                close = suggest(metric.removeprefix("acc/"), types).replace(" '", " 'acc/")
            else:
                close = suggest(metric, [c for c in columns if not c.startswith("acc/")])
            raise ExpectationError(f"metric '{metric}' is not in this study's results.{close} "
                                   f"Measured: {', '.join(columns)}")
        return
    if metric in PLAIN_METRICS:
        return
    if metric.startswith("acc/"):
        qtype = metric.removeprefix("acc/")
        if not qtype:
            raise ExpectationError(f"metric '{metric}' names no question type; write 'acc/<question_type>'")
        if question_types is not None and qtype not in question_types:
            raise ExpectationError(f"metric '{metric}': '{qtype}' is not a question type of the evaluation set."
                                   f"{suggest(qtype, question_types)} Valid: {', '.join(question_types)}")
        return
    known = list(PLAIN_METRICS) + [f"acc/{q}" for q in question_types or []]
    raise ExpectationError(f"unknown metric '{metric}'.{suggest(metric, known)} Valid: "
                           f"{', '.join(PLAIN_METRICS)}, acc/<question_type>")


def _axis_value(token: str, axis: str, values: list[str]) -> str:
    if token in values:
        return token
    if _is_number(token):
        for v in values:  # 1e-3 written for 0.001, 16.0 for 16
            if _is_number(v) and float(v) == float(token):
                return v
    raise ExpectationError(f"'{token}' is not a value of grid axis '{axis}'.{suggest(token, values)} "
                           f"Values: {', '.join(values)}")


def _find_axis(token: str, axes: dict[str, list[str]]) -> tuple[str | None, str]:
    """(axis, value) for ``axis=value`` or a bare value; axis None when the bare value is in no axis."""
    if "=" in token:
        axis, _, value = token.partition("=")
        if axis not in axes:
            raise ExpectationError(f"'{axis}' is not a grid axis.{suggest(axis, list(axes))} "
                                   f"Axes: {', '.join(axes) or '(none)'}")
        return axis, _axis_value(value, axis, axes[axis])
    found = []
    for axis, values in axes.items():
        try:
            found.append((axis, _axis_value(token, axis, values)))
        except ExpectationError:
            continue
    if len(found) > 1:
        raise ExpectationError(f"'{token}' is a value of more than one axis ({', '.join(a for a, _ in found)}); "
                               f"write it as axis=value, e.g. '{found[0][0]}={token}'")
    return found[0] if found else (None, token)


def _unknown_value(token: str, axes: dict[str, list[str]]) -> ExpectationError:
    every = [f"{a}={v}" for a, vs in axes.items() for v in vs]
    bare = [v for vs in axes.values() for v in vs]
    hint = suggest(token, bare) or suggest(token, every)
    return ExpectationError(f"'{token}' is not a value of any grid axis.{hint} "
                            f"Axes: {'; '.join(f'{a}: ' + ', '.join(vs) for a, vs in axes.items()) or '(none)'}")


CELL_SEP = ","  # between the axis=value parts of a cell, and between the axes of a cell comparison's ``axis``


def cell_axes(axis: str) -> list[str]:
    """The grid axes a comparison's ``axis`` names: one, or a cell comparison's several."""
    return axis.split(CELL_SEP)


def cell_label(axis: str, values: dict[str, str]) -> str:
    """An arm's label for a comparison on ``axis``: the value (one axis) or ``a=x,b=y`` (a cell, in axis order)."""
    names = cell_axes(axis)
    if len(names) == 1:
        return values[names[0]]
    return CELL_SEP.join(f"{n}={values[n]}" for n in names)


def _resolve_cells(exp: Comparison, shown: dict[str, list[str]]) -> Comparison:
    """``a=x,b=y > a=u,b=v``: each side names the same axes, each part ``axis=value`` (or a bare value of one
    axis); the cells differ in at least one of them."""
    sides = []
    for side in (exp.a, exp.b):
        cell: dict[str, str] = {}
        for part in side.split(CELL_SEP):
            if not part:
                raise ExpectationError(f"'{side}': an empty part; write a cell as axis=value,axis=value")
            axis, value = _find_axis(part, shown)
            if axis is None:
                raise _unknown_value(part, shown)
            if axis in cell:
                raise ExpectationError(f"'{side}' sets axis '{axis}' twice")
            cell[axis] = value
        sides.append(cell)
    a, b = sides
    if set(a) != set(b):
        raise ExpectationError(f"'{exp.a}' and '{exp.b}' set different axes ({', '.join(a)} against "
                               f"{', '.join(b)}); a cell comparison sets the same axes on both sides")
    if a == b:
        raise ExpectationError(f"'{exp.text}' compares a cell with itself")
    order = [x for x in shown if x in a]  # the grid's axis order, whatever order the text names them in
    axis = CELL_SEP.join(order)
    return replace(exp, axis=axis, a=cell_label(axis, a), b=cell_label(axis, b))


def resolve(exp: Expectation, axes: dict[str, list[Any]], question_types: list[str] | None = None,
            columns: list[str] | None = None) -> Expectation:
    """Check an expectation against the grid's axes and the metrics; the returned one names its axis."""
    shown = {a: [show_value(v) for v in vs] for a, vs in axes.items()}
    check_metric(exp.metric, question_types, columns)
    if isinstance(exp, Trend):
        return _resolve_trend(exp, shown)
    if CELL_SEP in exp.a or CELL_SEP in exp.b:
        return _resolve_cells(exp, shown)
    qualified = [t.partition("=")[0] for t in (exp.a, exp.b) if "=" in t]
    if qualified and qualified[0] in shown:  # one side names the axis: read the other side's bare value in it
        exp = replace(exp, a=exp.a if "=" in exp.a else f"{qualified[0]}={exp.a}",
                      b=exp.b if "=" in exp.b else f"{qualified[0]}={exp.b}")
    axis_a, a = _find_axis(exp.a, shown)
    axis_b, b = _find_axis(exp.b, shown)
    if axis_a is None:
        raise _unknown_value(exp.a, shown)
    if axis_b is None:
        try:
            b = _axis_value(exp.b, axis_a, shown[axis_a])
        except ExpectationError:
            raise ExpectationError(f"'{exp.b}' is not a value of grid axis '{axis_a}' (where '{exp.a}' is)."
                                   f"{suggest(exp.b, shown[axis_a])} Values: {', '.join(shown[axis_a])}") from None
        axis_b = axis_a
    if axis_a != axis_b:
        raise ExpectationError(f"'{exp.a}' ({axis_a}) and '{exp.b}' ({axis_b}) are values of different axes; "
                               "compare two values of one axis")
    if a == b:
        raise ExpectationError(f"'{exp.text}' compares '{a}' with itself")
    return replace(exp, axis=axis_a, a=a, b=b)


def _resolve_trend(exp: Trend, shown: dict[str, list[str]]) -> Trend:
    if exp.axis not in shown:
        raise ExpectationError(f"'{exp.axis}' is not a grid axis.{suggest(exp.axis, list(shown))} "
                               f"Axes: {', '.join(shown) or '(none)'}")
    values = shown[exp.axis]
    if not all(_is_number(v) for v in values):
        numeric = [a for a, vs in shown.items() if vs and all(_is_number(v) for v in vs)]
        hint = suggest(exp.axis, numeric)
        raise ExpectationError(f"a trend needs an axis with numeric values; '{exp.axis}' has {', '.join(values)}.{hint}")
    ordered = tuple(sorted(values, key=float))
    if len(ordered) < 2:
        raise ExpectationError(f"a trend needs at least two values of '{exp.axis}', the grid has {', '.join(values)}")
    if exp.knee is None:
        return replace(exp, values=ordered)
    knee = _axis_value(exp.knee, exp.axis, list(ordered))
    if knee == ordered[0]:
        raise ExpectationError(f"'up to {exp.knee}': the knee is the smallest value of '{exp.axis}'; nothing rises "
                               "before it")
    if exp.flat_margin is not None and knee == ordered[-1]:
        raise ExpectationError(f"'then flat': no value of '{exp.axis}' lies after {knee}")
    return replace(exp, knee=knee, values=ordered)


def check_expectations(entries: Any, axes: dict[str, list[Any]] | None, source: str,
                       question_types: list[str] | None = None,
                       columns: list[str] | None = None) -> tuple[list[Expectation], list[str]]:
    """Parse every ``expect:`` entry and check its metric (and, with ``axes``, resolve it against the grid); returns
    the expectations and one error line per problem, each naming the file and the key path (``expect[1]``)."""
    if entries is None:
        return [], []
    if not isinstance(entries, list):
        return [], [f"{source}: expect: a list of expectation strings, got {type(entries).__name__}; {GRAMMAR}"]
    out: list[Expectation] = []
    errors: list[str] = []
    for i, entry in enumerate(entries):
        key = f"expect[{i}]"
        try:
            exp = parse_expectation(entry, key)
            if axes is not None:
                exp = resolve(exp, axes, question_types, columns)
            else:  # no grid to resolve against (a single run's recipe): the metric name is still checked
                check_metric(exp.metric, question_types, columns)
            out.append(exp)
        except ExpectationError as exc:
            errors.append(f"{source}: {key}: {exc}")
    return out, errors
