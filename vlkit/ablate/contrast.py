"""One contrast of two arms on one metric, by the best analysis a study's runs allow.

- **question level** (every paired run kept its answers, ``predictions_<stage>.jsonl``): the (pairs × questions)
  table of paired answer differences, seeds and questions both random (:func:`vlkit.ablate.stats.crossed_stat`);
- **run level** (a run made before vlkit kept answers): the paired t-test over the runs' metric values, as before.

Both give the effect a − b, its 95% and 90% intervals, the two-sided p, and with a margin the two one-sided tests'
p (TOST) and the non-equivalence p, or for a non-inferiority (``side``) the one-sided p of a − b beyond the margin on
the losing side, and of the opposite. Pairs come from vlkit/ablate/pairing.py; the arithmetic from stats.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from vlkit.ablate.pairing import pairs, question_pairs
from vlkit.ablate.stats import (ALPHA, CrossedStat, crossed_design, crossed_stat, paired_sd, paired_stat,
                                pairs_needed)

QUESTION_METHOD = ("answers paired by question within each seed pair, seeds and questions both random: crossed "
                   "seed × question variance components from two-way ANOVA mean squares, t with Satterthwaite df "
                   "(at most pairs − 1)")
RUN_LEVEL_METHOD = "paired t-test over the runs' values, paired by seed"


@dataclass
class Contrast:
    """Effect a − b on a metric over paired runs, by ``method`` (question or run)."""

    a: str
    b: str
    method: str  # "question" or "run"
    n: int  # pairs of runs
    settings: int  # settings of the other axes the pairs came from
    effect: float
    ci_low: float
    ci_high: float
    ci90_low: float
    ci90_high: float
    p: float  # two-sided, effect = 0
    sd: float  # SD of the run-level paired differences (both methods)
    questions: int = 0  # questions per pair (question level)
    margin: float | None = None
    p_tost: float | None = None  # inside ±margin
    p_outside: float | None = None  # beyond ±margin, on the estimate's side
    side: int = 0  # non-inferiority: +1 claims a − b > −margin, −1 claims a − b < +margin; 0: no such claim
    p_noninferior: float | None = None  # side·(a − b) > −margin, one-sided
    p_inferior: float | None = None  # side·(a − b) < −margin, one-sided: worse by more than the margin
    crossed: CrossedStat | None = field(default=None, repr=False)


def contrast(rows: list[dict[str, Any]], answers: dict[str, Any] | None, axes: list[str], axis: str, a: str, b: str,
             metric: str, margin: float | None = None, side: int = 0) -> Contrast:
    """a − b on ``metric``: question level when every paired run has answers for it, else run level. With a
    margin: equivalence within ±margin (side 0), or non-inferiority on ``side`` (+1: a − b > −margin)."""
    xa, xb, settings = pairs(rows, axes, axis, a, b, metric)
    diffs = [x - y for x, y in zip(xa, xb)]
    sd = paired_sd(diffs)
    table = question_pairs(rows, answers, axes, axis, a, b, metric) if answers else None
    if table is not None and table.shape[0] >= 2 and table.shape[1] >= 2:
        cs = crossed_stat(table)
        lo, hi = cs.ci(0.95)
        lo90, hi90 = cs.ci(1 - 2 * ALPHA)
        out = Contrast(a, b, "question", cs.n, settings, cs.effect, lo, hi, lo90, hi90, cs.p(), sd,
                       questions=cs.questions, margin=margin, crossed=cs, side=side)
        if margin is not None and side:
            out.p_noninferior, out.p_inferior = cs.p_beyond(-side * margin, side), cs.p_beyond(-side * margin, -side)
        elif margin is not None:
            out.p_tost, out.p_outside = cs.p_tost(margin), cs.p_outside(margin)
        return out
    st = paired_stat(xa, xb, settings, a, b, margin)
    lo90, hi90 = _t_interval(st.effect, st.sd, st.n, 1 - 2 * ALPHA)
    out = Contrast(a, b, "run", st.n, st.settings, st.effect, st.ci_low, st.ci_high, lo90, hi90, st.p, st.sd,
                   margin=margin, side=side)
    if margin is not None and side:
        out.p_noninferior = _run_beyond(st.effect, st.sd, st.n, -side * margin, side)
        out.p_inferior = _run_beyond(st.effect, st.sd, st.n, -side * margin, -side)
    elif margin is not None:
        out.p_tost = st.p_tost
        out.p_outside = _run_outside(st.effect, st.sd, st.n, margin)
    return out


def _t_interval(mean: float, sd: float, n: int, level: float) -> tuple[float, float]:
    from scipy import stats

    if n < 2 or not sd > 0:
        return math.nan, math.nan  # no spread of the paired differences: no interval (stats.paired_test)
    hw = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean - hw, mean + hw


def _run_outside(mean: float, sd: float, n: int, margin: float) -> float:
    """One-sided paired-t p that the true difference lies beyond ±margin on the estimate's side."""
    side = 1 if mean >= 0 else -1
    return _run_beyond(mean, sd, n, side * margin, side)


def _run_beyond(mean: float, sd: float, n: int, bound: float, side: int) -> float:
    """One-sided paired-t p that the true difference lies above ``bound`` (side +1) or below it (side −1)."""
    from scipy import stats

    if n < 2 or not sd > 0:
        return math.nan
    return float(stats.t.sf(side * (mean - bound) / (sd / math.sqrt(n)), n - 1))


def noninferior_estimate(c: Contrast) -> bool:
    """A non-inferiority contrast whose estimate lies on the claimed side of the margin."""
    assert c.side and c.margin is not None
    return c.side * c.effect > -c.margin


def claim_p(c: Contrast) -> float:
    """The p of what a contrast decides: effect ≠ 0 without a margin; with one, TOST p when the estimate lies
    inside ±margin, else the non-equivalence p (one of the two is always ≥ 0.5); a non-inferiority: its one-sided
    p when the estimate lies on the claimed side of the margin, else the p of being worse by more than it."""
    if c.margin is None:
        return c.p
    if c.side:
        assert c.p_noninferior is not None and c.p_inferior is not None
        return c.p_noninferior if noninferior_estimate(c) else c.p_inferior
    assert c.p_tost is not None and c.p_outside is not None
    if math.isnan(c.p_tost):
        return math.nan
    return c.p_tost if abs(c.effect) < c.margin else c.p_outside


def seeds_for(c: Contrast, delta: float, alpha: float, power: float, questions: int | None = None) -> int | None:
    """Seeds per arm that would reach ``power`` for a true effect ``delta`` at two-sided ``alpha``: question level
    from the variance components at ``questions`` per pair (default: as now), run level from the SD of paired
    differences. Divided over the settings of the other axes (each seed gives a pair in each)."""
    if c.method == "question" and c.crossed is not None:
        cs = c.crossed
        k = crossed_design(delta, cs.var_seed, cs.var_question, cs.var_residual, questions or cs.questions,
                           alpha, power)
    else:
        k = pairs_needed(c.sd, delta, alpha, power)
    return None if k is None else max(2, math.ceil(k / max(1, c.settings)))


__all__ = ["Contrast", "contrast", "claim_p", "noninferior_estimate", "seeds_for", "QUESTION_METHOD",
           "RUN_LEVEL_METHOD"]
