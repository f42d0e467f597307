"""Statistics of paired runs: plain functions on arrays of numbers, with no knowledge of runs, grids or metrics.

Paired t-test and t-interval, two one-sided tests (equivalence), Holm's step-down correction, and the paired-t power
calculation behind a report's "seeds per arm" notes. vlkit/ablate/pairing.py makes the arrays from a study's runs;
vlkit/ablate/findings.py and vlkit/ablate/tables.py read these numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

ALPHA = 0.05
POWER = 0.8


def number(x: Any) -> float | None:
    """A metric cell as a float: numbers as they are, numeric strings (results.csv) parsed, else None (also for
    booleans, NaN and infinities). The one rule for "a numeric cell" of a study's results."""
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


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the t-based confidence interval (0 for one value)."""
    from scipy import stats

    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, float("nan")
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n))


def paired_test(a: list[float], b: list[float]) -> dict[str, float]:
    """Paired t-test of b - a over matched seeds."""
    from scipy import stats

    diffs = [y - x for x, y in zip(a, b)]
    m, hw = mean_ci(diffs)
    if len(diffs) < 2 or all(d == diffs[0] for d in diffs):
        p = 0.0 if diffs and diffs[0] != 0 and len(diffs) > 1 else float("nan")
    else:
        p = float(stats.ttest_rel(b, a).pvalue)
    return {"diff": m, "ci": hw, "p": p, "n": len(diffs)}


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


def paired_stat(xa: list[float], xb: list[float], settings: int, a: str, b: str,
                margin: float | None = None) -> PairedStat:
    """Paired effect a − b: mean, SD, 95% t-interval, two-sided p (:func:`paired_test`) and, with a margin, TOST p."""
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
