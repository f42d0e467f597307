"""One contrast of two arms on one metric, by the best analysis a study's runs allow.

- **question level** (every paired run kept its answers, ``predictions_<stage>.jsonl``): the (pairs × questions)
  table of paired answer differences, seeds and questions both random (:func:`vlkit.ablate.stats.crossed_stat`);
- **run level** (a run made before vlkit kept answers): the paired t-test over the runs' metric values, as before.

Both give the effect a − b, its 95% and 90% intervals, the two-sided p, and with a margin the two one-sided tests'
p (TOST) and the non-equivalence p. Pairs come from vlkit/ablate/pairing.py; the arithmetic from stats.py.
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
    crossed: CrossedStat | None = field(default=None, repr=False)


def contrast(rows: list[dict[str, Any]], answers: dict[str, Any] | None, axes: list[str], axis: str, a: str, b: str,
             metric: str, margin: float | None = None) -> Contrast:
    """a − b on ``metric``: question level when every paired run has answers for it, else run level."""
    xa, xb, settings = pairs(rows, axes, axis, a, b, metric)
    diffs = [x - y for x, y in zip(xa, xb)]
    sd = paired_sd(diffs)
    table = question_pairs(rows, answers, axes, axis, a, b, metric) if answers else None
    if table is not None and table.shape[0] >= 2 and table.shape[1] >= 2:
        cs = crossed_stat(table)
        lo, hi = cs.ci(0.95)
        lo90, hi90 = cs.ci(1 - 2 * ALPHA)
        out = Contrast(a, b, "question", cs.n, settings, cs.effect, lo, hi, lo90, hi90, cs.p(), sd,
                       questions=cs.questions, margin=margin, crossed=cs)
        if margin is not None:
            out.p_tost, out.p_outside = cs.p_tost(margin), cs.p_outside(margin)
        return out
    st = paired_stat(xa, xb, settings, a, b, margin)
    lo90, hi90 = _t_interval(st.effect, st.sd, st.n, 1 - 2 * ALPHA)
    out = Contrast(a, b, "run", st.n, st.settings, st.effect, st.ci_low, st.ci_high, lo90, hi90, st.p, st.sd,
                   margin=margin)
    if margin is not None:
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
    from scipy import stats

    if n < 2 or not sd > 0:
        return math.nan
    return float(stats.t.sf((abs(mean) - margin) / (sd / math.sqrt(n)), n - 1))


def claim_p(c: Contrast) -> float:
    """The p of what a contrast decides: effect ≠ 0 without a margin; with one, TOST p when the estimate lies
    inside ±margin, else the non-equivalence p (one of the two is always ≥ 0.5)."""
    if c.margin is None:
        return c.p
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


__all__ = ["Contrast", "contrast", "claim_p", "seeds_for", "QUESTION_METHOD", "RUN_LEVEL_METHOD"]
