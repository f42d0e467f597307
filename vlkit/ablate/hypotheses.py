"""Declared expectations of a study (``expect:`` in an ablation recipe), checked by the report.

Grammar (one string per expectation; ``+-`` may stand for ``±``)::

    <a> > <b> on <metric>                   a beats b (the metric is higher for a)
    <a> < <b> on <metric>                   a is lower than b
    <a> ~ <b> on <metric> (±<margin>)       a and b are equivalent: their difference lies within ±margin
    <metric> increases with <axis> [up to <value> [then flat (±<margin>)]]
    <metric> decreases with <axis> [up to <value> [then flat (±<margin>)]]

``<a>`` and ``<b>`` are two values of one grid axis (``patch``, ``cls``; write ``axis=value`` when a value belongs
to more than one axis). ``<metric>`` is a column of results.csv: ``accuracy``, ``val_loss``, ``final_loss``,
``bleu``, ``tokens_per_s``, ``wall_time_s`` or ``acc/<question_type>``. A trend's axis must have numeric values
(they are ordered numerically: 1, 4, 9, 16, 64).

Statistics (all paired):

- **Pairing.** The two arms are paired by seed within each setting of the grid's other axes: a pair is two runs
  that differ only in the compared axis. Pairs from every setting of the other axes are pooled, so the effect is the
  mean over those settings; runs that are not finished, or lack the metric, drop out with their partner.
- **Comparisons** ``>`` / ``<``: effect = mean of (a − b) over pairs, its 95% t-interval, and the two-sided paired
  t-test. Supported when the Holm-corrected p < 0.05 and the effect has the expected sign; contradicted when the
  Holm-corrected p < 0.05 and the sign is the opposite; inconclusive otherwise.
- **Equivalence** ``~``: judged by the 95% CI alone, not by p > 0.05: supported when the whole CI lies inside
  ±margin, contradicted when it lies wholly outside, inconclusive when it straddles a bound. The listed p is the
  two one-sided tests' (TOST) p, Holm-corrected with the others for reference.
- **Trends**: each consecutive step of the axis' sorted values up to the knee (every step without ``up to``) is a
  paired comparison later − earlier in the stated direction; with ``then flat (±m)`` each step after the knee is an
  equivalence with margin m. The trend claims all its steps at once, so its p is the largest of its steps' p
  (an intersection-union test: no correction among its own steps is needed). Supported when that p, Holm-corrected
  across the study's expectations, is < 0.05, every rising step goes the stated way and every flat step's CI lies
  inside the margin; contradicted when a step goes significantly the wrong way (its p Holm-corrected across the
  trend's steps < 0.05) or a flat step's CI lies wholly outside the margin; inconclusive otherwise.
- **Holm** across all of a study's expectations (step-down, family-wise error 5%).
- **Power note** (inconclusive verdicts), one line: seeds per arm that would settle it, given the observed SD of
  the paired differences, by a paired t power calculation (noncentral t; the search starts from the normal
  approximation n = ((z_{1-α/2} + z_{power}) · SD / δ)²), divided by the settings of the other axes (each seed gives
  one pair per setting). ``>`` / ``<`` and trend steps: δ = the observed effect, 80% power, at α = 0.05 / (number
  of tested expectations), the strictest level Holm may apply. ``~`` with the effect inside the margin: δ = the
  margin, assuming a true difference of 0, 90% power per one-sided bound (>= 80% for both); outside it: δ = effect −
  margin. A trend's note is for its weakest step (largest p). It is planning arithmetic on a noisy SD, not a promise.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from vlkit.registry import suggest

ALPHA = 0.05
POWER = 0.8
MAX_SEEDS = 1000  # a power note asking for more seeds than this says "no practical number" instead
PLAIN_METRICS = ("accuracy", "val_loss", "final_loss", "bleu", "tokens_per_s", "wall_time_s")
Verdict = Literal["supported", "contradicted", "inconclusive", "not tested"]

_VALUE = r"[^\s<>~()]+"
_COMPARISON = re.compile(rf"^(?P<a>{_VALUE})\s*(?P<op>[<>~])\s*(?P<b>{_VALUE})(?:\s+(?P<on>[^\s()]+)\s+(?P<metric>[^\s()]+))?"
                         r"(?:\s*\((?P<margin>[^)]*)\))?$")
_TREND = re.compile(r"^(?P<metric>[^\s()]+)\s+(?P<dir>\w+)\s+with\s+(?P<axis>\S+)"
                    r"(?:\s+up\s+to\s+(?P<knee>[^\s()]+))?(?:\s+then\s+(?P<flat>\w+)\s*(?:\((?P<margin>[^)]*)\))?)?$")
_MARGIN = re.compile(r"^(?:±|\+-|\+/-)\s*(?P<num>[0-9.eE+-]+)$")
GRAMMAR = ("write '<a> > <b> on <metric>', '<a> < <b> on <metric>', '<a> ~ <b> on <metric> (±margin)' or "
           "'<metric> increases|decreases with <axis> [up to <value> [then flat (±margin)]]'")


class ExpectationError(ValueError):
    """One expectation that cannot be read or does not fit the grid; the message says why."""


@dataclass(frozen=True)
class Comparison:
    key: str  # expect[i]
    text: str
    metric: str
    op: Literal[">", "<", "~"]
    a: str  # axis value as written (``axis=`` prefix removed once resolved)
    b: str
    margin: float | None = None  # "~" only
    axis: str | None = None  # filled by resolve()


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
    m = _COMPARISON.match(s)
    if m:
        return _comparison(m, s, key)
    m = _TREND.match(s)
    if m:
        return _trend(m, s, key)
    raise ExpectationError(f"cannot read '{s}'; {GRAMMAR}")


def _comparison(m: re.Match[str], s: str, key: str) -> Comparison:
    if m["on"] is None:
        raise ExpectationError(f"'{s}' names no metric; write '{m['a']} {m['op']} {m['b']} on <metric>'")
    if m["on"] != "on":
        raise ExpectationError(f"'{s}': expected 'on <metric>' after '{m['a']} {m['op']} {m['b']}', got '{m['on']}'")
    op = m["op"]
    margin = None
    if op == "~":
        if m["margin"] is None:
            raise ExpectationError(f"'{s}': an equivalence needs its margin, e.g. '{s} (±0.05)'")
        margin = parse_margin(m["margin"])
    elif m["margin"] is not None:
        raise ExpectationError(f"'{s}': a margin only applies to '~' (equivalence); remove '({m['margin']})'")
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
def show_value(value: Any) -> str:
    """An axis value as results.csv writes it (lists joined with '+')."""
    return "+".join(map(str, value)) if isinstance(value, list) else str(value)


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


def resolve(exp: Expectation, axes: dict[str, list[Any]], question_types: list[str] | None = None,
            columns: list[str] | None = None) -> Expectation:
    """Check an expectation against the grid's axes and the metrics; the returned one names its axis."""
    shown = {a: [show_value(v) for v in vs] for a, vs in axes.items()}
    check_metric(exp.metric, question_types, columns)
    if isinstance(exp, Trend):
        return _resolve_trend(exp, shown)
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


def toy_question_types(eval_data: str | None) -> list[str] | None:
    """The question types an evaluation set has, when known before any run: the toy world's."""
    if eval_data and eval_data.startswith("toy:"):
        from vlkit.data.toy import QUESTION_TYPES

        return list(QUESTION_TYPES)
    return None


# ---- statistics ------------------------------------------------------------------------------------------------
@dataclass
class PairedStat:
    """Effect = mean of (a − b) over paired runs, with the paired t statistics."""

    a: str
    b: str
    n: int
    settings: int  # settings of the other axes the pairs came from
    effect: float
    sd: float
    ci_low: float
    ci_high: float
    p: float  # two-sided paired t-test of effect = 0
    p_tost: float | None = None  # equivalence within ±margin (two one-sided tests)


def _number(x: Any) -> float | None:
    """A metric cell as a float: numbers as they are, numeric strings (results.csv) parsed, else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, str) and x.strip():
        try:
            v = float(x)
        except ValueError:
            return None
        return v if math.isfinite(v) else None
    return None


def pairs(rows: list[dict[str, Any]], axes: list[str], axis: str, a: str, b: str,
          metric: str) -> tuple[list[float], list[float], int]:
    """Metric values of arm a and arm b, paired by seed within each setting of the other axes; and the number of
    settings that gave a pair."""
    others = [x for x in axes if x != axis]
    arms: dict[str, dict[tuple, float]] = {a: {}, b: {}}
    for r in rows:
        if r.get("status") != "finished":
            continue
        arm = show_value(r.get(axis))
        value = _number(r.get(metric))
        if arm in arms and value is not None:
            arms[arm][tuple(show_value(r.get(x)) for x in others) + (str(r.get("seed")),)] = value
    common = sorted(set(arms[a]) & set(arms[b]))
    return [arms[a][k] for k in common], [arms[b][k] for k in common], len({k[:-1] for k in common})


def paired_stat(xa: list[float], xb: list[float], settings: int, a: str, b: str,
                margin: float | None = None) -> PairedStat:
    """Paired effect a − b: mean, SD, 95% t-interval, two-sided p (report.paired_test) and, with a margin, TOST p."""
    from vlkit.ablate.report import paired_test

    if not xa:
        nan = float("nan")
        return PairedStat(a, b, 0, 0, nan, nan, nan, nan, nan, nan if margin is not None else None)
    t = paired_test(xb, xa)  # its diff is (second − first) = a − b
    n, m, hw = t["n"], t["diff"], t["ci"]
    diffs = [x - y for x, y in zip(xa, xb)]
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / (n - 1)) if n > 1 else float("nan")
    if n > 1 and sd == 0:
        hw = 0.0  # every pair differs by the same amount: the interval is that point
    stat = PairedStat(a, b, n, settings, m, sd, m - hw, m + hw, t["p"])
    if margin is not None:
        stat.p_tost = tost_p(m, sd, n, margin)
    return stat


def tost_p(mean: float, sd: float, n: int, margin: float) -> float:
    """p of the two one-sided t-tests that the true difference lies inside ±margin (the larger of the two)."""
    from scipy import stats

    if n < 2:
        return float("nan")
    if sd == 0:
        return 0.0 if abs(mean) < margin else 1.0
    se = sd / math.sqrt(n)
    lower = float(stats.t.sf((mean + margin) / se, n - 1))  # H0: diff <= -margin
    upper = float(stats.t.sf((margin - mean) / se, n - 1))  # H0: diff >= +margin
    return max(lower, upper)


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (a missing p, NaN, counts as 1 and stays NaN)."""
    m = len(ps)
    order = sorted(range(m), key=lambda i: 1.0 if math.isnan(ps[i]) else ps[i])
    out = [float("nan")] * m
    running = 0.0
    for rank, i in enumerate(order):
        p = 1.0 if math.isnan(ps[i]) else ps[i]
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = float("nan") if math.isnan(ps[i]) else running
    return out


def pairs_needed(sd: float, delta: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """Pairs for a two-sided paired t-test at ``alpha`` to detect a true mean difference ``delta`` with ``power``
    (noncentral t; the search starts at the normal approximation ((z_{1-α/2} + z_power) · sd / delta)²). None when
    it cannot be said: no spread measured, or no effect to detect."""
    from scipy import stats

    if not (math.isfinite(sd) and math.isfinite(delta)) or delta == 0 or sd == 0:
        return None
    z = float(stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power))
    n = max(2, math.ceil((z * sd / abs(delta)) ** 2))
    while n < 10**6:
        crit = float(stats.t.ppf(1 - alpha / 2, n - 1))
        if float(stats.nct.sf(crit, n - 1, abs(delta) / sd * math.sqrt(n))) >= power:
            return n
        n += 1
    return n


def seeds_needed(sd: float, delta: float, settings: int, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """Seeds per arm: :func:`pairs_needed` over the settings of the other axes (each seed gives one pair each)."""
    n = pairs_needed(sd, delta, alpha, power)
    return None if n is None else max(2, math.ceil(n / max(1, settings)))


# ---- verdicts --------------------------------------------------------------------------------------------------
@dataclass
class Finding:
    key: str
    text: str
    kind: str  # comparison, equivalence, trend (or unread: an entry the report could not test)
    metric: str
    axis: str | None
    verdict: Verdict
    sentence: str
    effect: float | None = None  # comparisons: a − b; trends: the deciding step (later − earlier)
    ci_low: float | None = None
    ci_high: float | None = None
    p: float | None = None  # the expectation's p before correction (TOST p for "~"; a trend's largest step p)
    p_holm: float | None = None
    n_pairs: int = 0
    margin: float | None = None
    power_note: str | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def comparison_verdict(stat: PairedStat, op: str, margin: float | None, p_holm: float) -> Verdict:
    """The verdict rules of the module docstring, for one comparison or equivalence."""
    if stat.n < 2 or math.isnan(stat.ci_low):
        return "inconclusive"
    if op == "~":
        assert margin is not None
        if -margin <= stat.ci_low and stat.ci_high <= margin:
            return "supported"
        if stat.ci_high < -margin or stat.ci_low > margin:
            return "contradicted"
        return "inconclusive"
    if math.isnan(p_holm) or p_holm >= ALPHA:
        return "inconclusive"
    expected = 1 if op == ">" else -1
    return "supported" if expected * stat.effect > 0 else "contradicted"


def _step_verdict(stat: PairedStat, sign: int, margin: float | None, p_step_holm: float) -> Verdict:
    if margin is not None:
        return comparison_verdict(stat, "~", margin, p_step_holm)
    return comparison_verdict(stat, ">" if sign > 0 else "<", None, p_step_holm)


def trend_steps(exp: Trend, rows: list[dict[str, Any]], axes: list[str]) -> list[tuple[PairedStat, float | None]]:
    """(later − earlier statistics, flat margin or None) for each consecutive step of the trend's axis."""
    values = list(exp.values)
    knee = values.index(exp.knee) if exp.knee is not None else len(values) - 1
    last = len(values) - 1 if exp.flat_margin is not None else knee
    out = []
    for i in range(last):
        lo, hi = values[i], values[i + 1]
        margin = exp.flat_margin if i >= knee else None
        xa, xb, settings = pairs(rows, axes, exp.axis, hi, lo, exp.metric)
        out.append((paired_stat(xa, xb, settings, hi, lo, margin), margin))
    return out


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{round(x, 3) + 0.0:+.3f}"  # + 0.0: no "-0.000"


def _p(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3g}"


def _ci(stat: PairedStat) -> str:
    return "no CI (fewer than 2 pairs)" if math.isnan(stat.ci_low) else f"95% CI {_fmt(stat.ci_low)} to {_fmt(stat.ci_high)}"


def _power_note(stat: PairedStat, margin: float | None, family: int) -> str:
    """One line: seeds per arm that would settle an inconclusive verdict (module docstring, Power note)."""
    if stat.n < 2:
        return (f"Power: {stat.n} pair(s); at least 2 seeds per arm are needed to estimate a spread, then "
                "the SD of paired differences says how many more.")
    per = f" (× {stat.settings} settings of the other axes)" if stat.settings > 1 else ""
    if margin is not None and abs(stat.effect) < margin:
        # both one-sided bounds must clear the margin: 90% power each gives >= 80% for the pair
        n = seeds_needed(stat.sd, margin, stat.settings, ALPHA, 1 - (1 - POWER) / 2)
        what = f"put the 95% CI inside ±{margin:g} with 80% probability if the true difference were 0"
    elif margin is not None:
        n = seeds_needed(stat.sd, abs(stat.effect) - margin, stat.settings, ALPHA, POWER)
        what = f"put the 95% CI outside ±{margin:g} with 80% probability if the true difference were the observed " \
               f"{_fmt(stat.effect)}"
    else:
        n = seeds_needed(stat.sd, stat.effect, stat.settings, ALPHA / family, POWER)
        level = f"α = 0.05/{family}, the strictest level Holm can apply" if family > 1 else "α = 0.05"
        what = f"detect the observed effect {_fmt(stat.effect)} with 80% power at {level}"
    if n is None or n > MAX_SEEDS:
        return (f"Power: the observed effect is {_fmt(stat.effect)} with SD {stat.sd:.3f} of paired differences; "
                f"no practical number of seeds (≤ {MAX_SEEDS:,}) resolves it — state the smallest effect that matters "
                "and size the study for it.")
    return (f"Power: about {n} seeds per arm{per} would {what}, given the observed SD {stat.sd:.3f} of paired "
            f"differences (paired t; now {stat.n} pairs).")


def _comparison_sentence(exp: Comparison, stat: PairedStat, verdict: Verdict, p_holm: float) -> str:
    eff = f"{exp.a} − {exp.b} = {_fmt(stat.effect)} on {exp.metric} ({_ci(stat)}, {stat.n} pairs"
    if exp.op == "~":
        where = {"supported": f"the whole CI lies inside ±{exp.margin:g}, so {exp.a} and {exp.b} are equivalent",
                 "contradicted": f"the whole CI lies outside ±{exp.margin:g}, so they differ by more than the margin",
                 "inconclusive": f"the CI crosses ±{exp.margin:g}, so the data cannot tell equivalence from a "
                                 "difference"}[verdict]
        return f"{verdict.capitalize()}: {eff}); {where}."
    word = "higher" if exp.op == ">" else "lower"
    if verdict == "supported":
        why = f"{exp.a} is {word} than {exp.b} as expected (Holm p = {_p(p_holm)})"
    elif verdict == "contradicted":
        why = f"{exp.a} is significantly {'lower' if exp.op == '>' else 'higher'}, the opposite of the expectation " \
              f"(Holm p = {_p(p_holm)})"
    elif stat.n > 1 and stat.sd == 0 and stat.effect == 0:
        why = "every pair is exactly equal, so there is no difference to test"
    else:
        why = f"not significant after Holm correction (p = {_p(p_holm)}), so the direction is not established"
    return f"{verdict.capitalize()}: {eff}); {why}."


def judge(expectations: list[Expectation], rows: list[dict[str, Any]], axes: list[str]) -> list[Finding]:
    """Findings for resolved expectations over result rows (report rows or results.csv rows), Holm-corrected
    across all of them."""
    findings: list[Finding] = []
    stats_of: dict[str, Any] = {}
    for exp in expectations:
        if isinstance(exp, Trend):
            stats_of[exp.key] = trend_steps(exp, rows, axes)
        else:
            xa, xb, settings = pairs(rows, axes, exp.axis, exp.a, exp.b, exp.metric)  # type: ignore[arg-type]
            stats_of[exp.key] = paired_stat(xa, xb, settings, exp.a, exp.b, exp.margin)
    keys = list(stats_of)
    raw = [_expectation_p(stats_of[k]) for k in keys]
    adjusted = dict(zip(keys, holm(raw)))
    for exp in expectations:
        if isinstance(exp, Trend):
            findings.append(_judge_trend(exp, stats_of[exp.key], adjusted[exp.key], len(keys)))
        else:
            findings.append(_judge_comparison(exp, stats_of[exp.key], adjusted[exp.key], len(keys)))
    return findings


def _expectation_p(stat: PairedStat | list[tuple[PairedStat, float | None]]) -> float:
    if isinstance(stat, PairedStat):
        return stat.p_tost if stat.p_tost is not None else stat.p
    ps = [s.p_tost if m is not None else s.p for s, m in stat]
    return float("nan") if not ps or any(math.isnan(p) for p in ps) else max(ps)


def _judge_comparison(exp: Comparison, stat: PairedStat, p_holm: float, family: int) -> Finding:
    verdict = comparison_verdict(stat, exp.op, exp.margin, p_holm)
    kind = "equivalence" if exp.op == "~" else "comparison"
    note = _power_note(stat, exp.margin, family) if verdict == "inconclusive" else None
    return Finding(exp.key, exp.text, kind, exp.metric, exp.axis, verdict,
                   _comparison_sentence(exp, stat, verdict, p_holm), stat.effect, stat.ci_low, stat.ci_high,
                   _expectation_p(stat), p_holm, stat.n, exp.margin, note)


def _judge_trend(exp: Trend, steps: list[tuple[PairedStat, float | None]], p_holm: float, family: int) -> Finding:
    sign = 1 if exp.direction == "increases" else -1
    step_holm = holm([s.p for s, _ in steps])
    verdicts = [_step_verdict(s, sign, m, ph) for (s, m), ph in zip(steps, step_holm)]
    rising_right = all(sign * s.effect > 0 for s, m in steps if m is None)
    flat_inside = all(v == "supported" for (s, m), v in zip(steps, verdicts) if m is not None)
    if "contradicted" in verdicts:
        verdict: Verdict = "contradicted"
    elif not math.isnan(p_holm) and p_holm < ALPHA and rising_right and flat_inside:
        verdict = "supported"
    else:
        verdict = "inconclusive"
    ps = [s.p_tost if m is not None else s.p for s, m in steps]
    # the deciding step: the one with the largest p (a step without a p decides first)
    decide = max(range(len(steps)), key=lambda i: math.inf if math.isnan(ps[i]) else ps[i]) if steps else None
    step_rows = [{"from": s.b, "to": s.a, "kind": "flat" if m is not None else exp.direction, "effect": s.effect,
                  "ci_low": s.ci_low, "ci_high": s.ci_high, "p": s.p_tost if m is not None else s.p,
                  "p_holm_within_trend": ph, "n_pairs": s.n, "verdict": v}
                 for (s, m), ph, v in zip(steps, step_holm, verdicts)]
    step_rows = [{k: (None if isinstance(x, float) and math.isnan(x) else x) for k, x in r.items()} for r in step_rows]
    parts = ", ".join(f"{s.b}→{s.a} {_fmt(s.effect)}" for s, _ in steps)
    rise = "rises" if sign > 0 else "falls"
    knee = f" up to {exp.knee}" if exp.knee else ""
    flat = f" and stays within ±{exp.flat_margin:g} after it" if exp.flat_margin is not None else ""
    claim = f"{exp.metric} {rise} with {exp.axis}{knee}{flat}"
    if verdict == "supported":
        sentence = f"Supported: {claim} (steps {parts}; trend Holm p = {_p(p_holm)})."
    elif verdict == "contradicted":
        bad = [f"{s.b}→{s.a}" for (s, _), v in zip(steps, verdicts) if v == "contradicted"]
        sentence = f"Contradicted: the expectation that {claim} fails at step(s) {', '.join(bad)} (steps {parts})."
    else:
        sentence = (f"Inconclusive: the data neither establish nor refute that {claim} (steps {parts}; trend Holm "
                    f"p = {_p(p_holm)}).")
    note = None
    if verdict == "inconclusive" and decide is not None:
        s, m = steps[decide]
        note = f"Weakest step {s.b}→{s.a}. " + _power_note(s, m, family)
    d = steps[decide][0] if decide is not None else None
    return Finding(exp.key, exp.text, "trend", exp.metric, exp.axis, verdict, sentence,
                   d.effect if d else None, d.ci_low if d else None, d.ci_high if d else None,
                   _expectation_p(steps) if steps else None, p_holm, min((s.n for s, _ in steps), default=0),
                   exp.flat_margin, note, step_rows)


def measured_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Metric columns with a number in at least one finished run (what an expectation can be tested on)."""
    cols: list[str] = []
    for r in rows:
        if r.get("status") != "finished":
            continue
        for k, v in r.items():
            if (k in PLAIN_METRICS or k.startswith("acc/")) and k not in cols and _number(v) is not None:
                cols.append(k)
    return sorted(cols, key=lambda c: (c.startswith("acc/"), c))


def findings_for(entries: list[Any], axes: dict[str, list[Any]], rows: list[dict[str, Any]]) -> list[Finding]:
    """The report's Findings: every ``expect:`` entry, checked again against the grid and the metrics the runs
    produced, then judged. An entry that cannot be tested (a metric no run measured) is listed as not tested, with
    the reason and the nearest measured name, and stays out of the Holm family."""
    columns = measured_columns(rows)
    testable: list[Expectation] = []
    untested: dict[str, Finding] = {}
    for i, entry in enumerate(entries):
        key = f"expect[{i}]"
        try:
            exp = parse_expectation(entry, key)
        except ExpectationError as exc:
            untested[key] = Finding(key, str(entry), "unread", "", None, "not tested", f"Not tested: {exc}.")
            continue
        try:
            if not columns:
                raise ExpectationError("no run of the study finished with a measured metric")
            testable.append(resolve(exp, axes, columns=columns))
        except ExpectationError as exc:
            kind = "trend" if isinstance(exp, Trend) else ("equivalence" if exp.op == "~" else "comparison")
            untested[key] = Finding(key, exp.text, kind, exp.metric, getattr(exp, "axis", None), "not tested",
                                    f"Not tested: {exc}.")
    judged = {f.key: f for f in judge(testable, rows, list(axes))}
    return [judged.get(f"expect[{i}]") or untested[f"expect[{i}]"] for i in range(len(entries))]


def findings_markdown(findings: list[Finding]) -> list[str]:
    """The report's Findings section: a table, then each verdict in one sentence (and a power note)."""
    family = sum(f.verdict != "not tested" for f in findings)
    lines = ["## Findings", "",
             "The study's declared expectations (`expect:` in its recipe), tested on paired runs: the two arms are "
             "paired by seed within each setting of the other axes. Effect = a − b (a trend: its deciding step, "
             "later − earlier) with its 95% t-interval; p is the paired t-test's (two one-sided tests' for `~`, "
             f"the largest step's for a trend), Holm-corrected across the {family} tested expectation(s). `~` is "
             "judged by whether the CI lies inside the margin. Rules: README, section Hypotheses.", "",
             "| key | expectation | effect | 95% CI | p | Holm p | pairs | verdict |", "|---|---|---|---|---|---|---|---|"]
    for f in findings:
        ci = "" if f.ci_low is None or math.isnan(f.ci_low) else f"{_fmt(f.ci_low)} to {_fmt(f.ci_high)}"
        effect = "" if f.effect is None else _fmt(f.effect)
        lines.append(f"| {f.key} | `{f.text}` | {effect} | {ci} | {_p(f.p)} | {_p(f.p_holm)} | {f.n_pairs} | "
                     f"**{f.verdict}** |")
    lines.append("")
    for f in findings:
        lines.append(f"- {f.key}: {f.sentence}" + (f" {f.power_note}" if f.power_note else ""))
    return lines + [""]


def findings_json(findings: list[Finding]) -> dict[str, Any]:
    """findings.json: every finding with its numbers, and the rules they were judged by."""
    return {"alpha": ALPHA, "power": POWER, "ci_level": 0.95,
            "holm_family": sum(f.verdict != "not tested" for f in findings),
            "pairing": "by seed within each setting of the grid's other axes; pairs pooled across settings",
            "effect": "mean of (a - b) over pairs; trends: the deciding step (largest p), later - earlier",
            "findings": [f.to_dict() for f in findings]}
