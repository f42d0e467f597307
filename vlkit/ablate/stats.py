"""Statistics of paired runs: plain functions on arrays of numbers, with no knowledge of runs, grids or metrics.

Paired t-test and t-interval, two one-sided tests (equivalence), Holm's step-down correction, and the paired-t power
calculation behind a report's "seeds per arm" notes. vlkit/ablate/pairing.py makes the arrays from a study's runs;
vlkit/ablate/findings.py and vlkit/ablate/tables.py read these numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

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


def no_spread(diffs: list[float]) -> bool:
    """Every difference is the same up to float rounding (accuracies are k/Q, and their differences are not exact in
    floating point: 0.55 − 0.45 ≠ 0.65 − 0.55)."""
    return bool(diffs) and max(diffs) - min(diffs) <= 1e-9 * max(1.0, max(abs(d) for d in diffs))


def paired_sd(diffs: list[float]) -> float:
    """SD of paired differences: NaN for fewer than 2, exactly 0 when they do not spread (:func:`no_spread`)."""
    n = len(diffs)
    if n < 2:
        return float("nan")
    if no_spread(diffs):
        return 0.0
    m = sum(diffs) / n
    return math.sqrt(sum((d - m) ** 2 for d in diffs) / (n - 1))


def paired_test(a: list[float], b: list[float]) -> dict[str, float]:
    """Paired t-test of b - a over matched seeds."""
    from scipy import stats

    diffs = [y - x for x, y in zip(a, b)]
    m, hw = mean_ci(diffs)
    if len(diffs) < 2 or no_spread(diffs):
        # one pair, or every pair differs by the same amount: the spread, and so the noise, is not estimated.
        # The test is undefined (not certain): n/a, never p = 0 and never a zero-width interval
        return {"diff": m, "ci": float("nan"), "p": float("nan"), "n": len(diffs)}
    return {"diff": m, "ci": hw, "p": float(stats.ttest_rel(b, a).pvalue), "n": len(diffs)}


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
    sd = paired_sd([x - y for x, y in zip(xa, xb)])
    stat = PairedStat(a, b, n, settings, m, sd, m - hw, m + hw, t["p"])
    if margin is not None:
        stat.p_tost = tost_p(m, sd, n, margin)
    return stat


def tost_p(mean: float, sd: float, n: int, margin: float) -> float:
    """p of the two one-sided t-tests that the true difference lies inside ±margin (the larger of the two)."""
    from scipy import stats

    if n < 2 or not sd > 0:
        return float("nan")  # no spread: the noise is not estimated, so neither test is defined (see paired_test)
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


# ---- question-level pairs: seeds x questions -------------------------------------------------------------------
@dataclass
class CrossedStat:
    """Paired effect over a (pairs × questions) table of differences, with seeds and questions both random.

    ``d[k, q]`` is arm a's answer to question q minus arm b's (1 / 0 correct) in pair k (one seed of one setting of
    the other axes). The effect is the mean of ``d``; its variance is that of a crossed two-way random-effects model
    d = δ + s_k + u_q + e_kq: ``var_seed`` (s: how the arms' difference moves from seed to seed), ``var_question``
    (u: questions one arm gets right more than the other, the same in every seed), ``var_residual`` (e: evaluation
    sampling within a seed), estimated by the method of moments (two-way ANOVA mean squares)."""

    n: int  # pairs (rows)
    questions: int  # questions (columns)
    effect: float
    se: float
    df: float  # Satterthwaite degrees of freedom of se²
    var_seed: float
    var_question: float
    var_residual: float
    # every answer the same in both arms (a table of zeros, e.g. both arms at 1.000): the variance components are
    # all 0, and a t-test would give a zero-width interval and p = 0. The tests then use the exact bound below
    identical: bool = False
    # every question answered right by one arm and wrong by the other, the same way in every seed (a table of all
    # +1 or all -1): the variance components are again all 0; exact sign bounds below instead of certainty
    unanimous: int = 0

    def discordance_bound(self, confidence: float) -> float:
        """For a table of zeros: the one-sided upper ``confidence`` bound on the share of questions the two arms
        answer differently, from 0 of Q observed (Clopper-Pearson: (1 − d)^Q = 1 − confidence). |effect| is at most
        that share. Q questions, not K·Q answers: the seeds answer the same questions, so they are not
        independent draws (Q alone is conservative)."""
        return 1.0 - (1.0 - confidence) ** (1.0 / self.questions)

    def ci(self, level: float = 0.95) -> tuple[float, float]:
        from scipy import stats

        if self.identical:
            u = self.discordance_bound(0.5 + level / 2)
            return -u, u
        if self.unanimous:
            # at most a share u of questions can differ otherwise (each by at most 2) unseen at this confidence
            u = self.discordance_bound(0.5 + level / 2)
            return (1.0 - 2 * u, 1.0) if self.unanimous > 0 else (-1.0, -1.0 + 2 * u)
        if not (self.se > 0 and self.df > 0):
            return math.nan, math.nan  # no variance left to estimate (a constant table that is not ±1 or 0)
        hw = float(stats.t.ppf(0.5 + level / 2, self.df)) * self.se
        return self.effect - hw, self.effect + hw

    def p(self) -> float:
        """Two-sided p of effect = 0."""
        from scipy import stats

        if self.identical:
            return 1.0  # no answer differs: nothing against effect = 0
        if self.unanimous:
            # with a true effect <= 0 at most half the questions go a's way: all Q of them with chance <= 0.5^Q
            return min(1.0, 2 * 0.5 ** self.questions)
        if not self.se > 0:
            return math.nan
        return float(2 * stats.t.sf(abs(self.effect) / self.se, self.df))

    def p_tost(self, margin: float) -> float:
        """Two one-sided tests that the true effect lies inside ±margin: the larger of their p."""
        from scipy import stats

        if self.identical:
            # |effect| >= margin needs the arms to differ on at least that share of questions; the chance of
            # seeing none of Q differ is then at most (1 - margin)^Q
            return (1.0 - margin) ** self.questions if margin < 1 else 0.0
        if self.unanimous:
            return 1.0 if margin < 1 else 0.0  # every question differs: nothing speaks for a difference inside ±m
        if not self.se > 0:
            return math.nan
        lower = stats.t.sf((self.effect + margin) / self.se, self.df)
        upper = stats.t.sf((margin - self.effect) / self.se, self.df)
        return float(max(lower, upper))

    def p_outside(self, margin: float) -> float:
        """One-sided p that the true effect lies beyond ±margin on the side of the estimate (non-equivalence)."""
        from scipy import stats

        if self.identical:
            return 1.0  # the estimate, 0, lies inside every margin
        if self.unanimous:
            # with a true effect <= m at most a share (1 + m)/2 of questions go the estimate's way: all Q <= that^Q
            return min(1.0, ((1.0 + margin) / 2) ** self.questions) if margin < 1 else 1.0
        if not self.se > 0:
            return math.nan
        return float(stats.t.sf((abs(self.effect) - margin) / self.se, self.df))

    def p_beyond(self, bound: float, side: int) -> float:
        """One-sided p of "the true effect lies above ``bound``" (side +1) or below it (side −1): a non-inferiority
        test when the bound is the margin on the losing side."""
        from scipy import stats

        if self.identical or self.unanimous:
            est = float(self.unanimous)  # the estimate: 0 for a table of zeros, ±1 for a unanimous one
            if side * (est - bound) <= 0:
                return 1.0  # the estimate is not on the claimed side of the bound
            if self.identical:
                # the other side of the bound needs the arms to differ on at least |bound| of the questions:
                # none of Q differing then has chance at most (1 − |bound|)^Q
                return (1.0 - abs(bound)) ** self.questions if abs(bound) < 1 else 0.0
            # with the true effect on the other side of the bound at most a share (1 + u·bound)/2 of questions go
            # the estimate's way u: all Q of them with chance at most that^Q
            return min(1.0, max(0.0, (1.0 + self.unanimous * bound) / 2) ** self.questions)  # |bound| >= 1: 0
        if not self.se > 0:
            return math.nan
        return float(stats.t.sf(side * (self.effect - bound) / self.se, self.df))


def mean_squares(d: "np.ndarray") -> tuple[float, float, float]:
    """Two-way ANOVA mean squares of a (pairs × questions) table without replication: rows, columns, residual."""
    import numpy as np

    k, q = d.shape
    g = d.mean()
    r, c = d.mean(axis=1), d.mean(axis=0)
    ms_row = q * float(np.sum((r - g) ** 2)) / (k - 1)
    ms_col = k * float(np.sum((c - g) ** 2)) / (q - 1)
    resid = d - r[:, None] - c[None, :] + g
    ms_e = float(np.sum(resid ** 2)) / ((k - 1) * (q - 1))
    return ms_row, ms_col, ms_e


def crossed_stat(d: "np.ndarray") -> CrossedStat:
    """:class:`CrossedStat` of a (pairs × questions) table of paired differences (at least 2 × 2).

    Var(mean) = σ²_seed/K + σ²_question/Q + σ²_e/(KQ) = (MS_rows + MS_cols − MS_e)/(KQ). The question component
    is kept only where it is positive (MS_cols > MS_e), so the variance is never below the seed-paired t-test's
    (MS_rows/(KQ): the variance of the K run-level differences over K). Degrees of freedom by Satterthwaite, at
    most K − 1: with 3 seeds and a large seed component, Satterthwaite's larger df gave a false-positive rate of
    0.0595 at α = 0.05 in the calibration simulation (tests/test_question_stats.py), K − 1 keeps it under α."""
    import numpy as np

    d = np.asarray(d, dtype=float)
    k, q = d.shape
    if k < 2 or q < 2:
        raise ValueError(f"a crossed analysis needs at least 2 pairs and 2 questions, got {k} × {q}")
    ms_row, ms_col, ms_e = mean_squares(d)
    var, df, extra = _crossed_var(np.array([ms_row]), np.array([ms_col]), np.array([ms_e]), k, q)
    return CrossedStat(k, q, float(d.mean()), math.sqrt(float(var[0])), float(df[0]),
                       max(0.0, (ms_row - ms_e) / q), float(extra[0]) / k, ms_e, identical=not d.any(),
                       unanimous=int(d.flat[0]) if abs(d.flat[0]) == 1 and bool((d == d.flat[0]).all()) else 0)


TIE = 1e-9  # relative: mean squares closer than this are equal (their float difference is rounding, not variance)


def _crossed_var(ms_row, ms_col, ms_e, k: int, q: int):
    """Vectorised variance of the mean, its Satterthwaite df and the question term MS_cols − MS_e (0 where it is not
    positive beyond rounding) from the three mean squares (arrays)."""
    import numpy as np

    # (Q−1)-df and (K−1)(Q−1)-df terms; only where positive beyond float rounding: a table whose one non-zero cell
    # is a single answer (cls ~ patch on count: 1 of 375) has MS_cols = MS_e = 1/(KQ) exactly, and the sign of their
    # rounded difference would otherwise pick the degrees of freedom
    diff = ms_col - ms_e
    extra = np.where(diff > TIE * np.maximum(np.abs(ms_col), np.abs(ms_e)), diff, 0.0)
    var = (ms_row + extra) / (k * q)
    # every seed pair's mean difference alike (MS_rows = 0 up to rounding) and no question term, yet answers differ
    # (MS_e > 0): the moments give no variance, which would make any such difference "certain" (p = 0); the
    # residual's sampling variance is the floor then
    var = np.where((ms_row + extra <= TIE * ms_e) & (ms_e > 0), ms_e / (k * q), var)
    denom = ms_row ** 2 / (k - 1) + np.where(extra > 0, ms_col ** 2 / (q - 1) + ms_e ** 2 / ((k - 1) * (q - 1)), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(denom > 0, (ms_row + extra) ** 2 / denom, float(k - 1))
    return var, np.minimum(df, k - 1), extra  # df never more than the seed pairs give: Satterthwaite alone ran over α


def crossed_stats_many(d: "np.ndarray") -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
    """Effect, se and df of many (pairs × questions) tables at once: ``d`` is (studies × K × Q); what the
    calibration simulation in the tests runs (the same arithmetic as :func:`crossed_stat`)."""
    import numpy as np

    d = np.asarray(d, dtype=float)
    _, k, q = d.shape
    g = d.mean(axis=(1, 2))
    r, c = d.mean(axis=2), d.mean(axis=1)
    ms_row = q * np.sum((r - g[:, None]) ** 2, axis=1) / (k - 1)
    ms_col = k * np.sum((c - g[:, None]) ** 2, axis=1) / (q - 1)
    resid = d - r[:, :, None] - c[:, None, :] + g[:, None, None]
    ms_e = np.sum(resid ** 2, axis=(1, 2)) / ((k - 1) * (q - 1))
    var, df, _ = _crossed_var(ms_row, ms_col, ms_e, k, q)
    return g, np.sqrt(var), df


def crossed_power(delta: float, var_seed: float, var_question: float, var_residual: float, k: int, q: int,
                  alpha: float = ALPHA) -> float:
    """Power of the two-sided crossed test at ``alpha`` for a true effect ``delta`` with K pairs and Q questions,
    given the variance components: noncentral t with the Satterthwaite df the expected mean squares give."""
    import numpy as np
    from scipy import stats

    ms_row, ms_e = q * var_seed + var_residual, var_residual
    ms_col = k * var_question + var_residual
    var, df, _ = _crossed_var(np.array([ms_row]), np.array([ms_col]), np.array([ms_e]), k, q)
    if not var[0] > 0:
        return math.nan
    nc = abs(delta) / math.sqrt(float(var[0]))
    crit = float(stats.t.ppf(1 - alpha / 2, df[0]))
    return float(stats.nct.sf(crit, df[0], nc) + stats.nct.cdf(-crit, df[0], nc))


def crossed_design(delta: float, var_seed: float, var_question: float, var_residual: float, q: int,
                   alpha: float = ALPHA, power: float = POWER, max_k: int = 1000) -> int | None:
    """Pairs (seeds per arm, with one setting) needed at Q questions for ``power``; None when no K ≤ max_k does
    (the question component alone keeps the variance above what the effect needs)."""
    if delta == 0 or not math.isfinite(delta):
        return None
    for k in range(2, max_k + 1):
        if crossed_power(delta, var_seed, var_question, var_residual, k, q, alpha) >= power:
            return k
    return None


def variance_split(groups: list[list[float]], n_questions: list[list[int]]) -> dict[str, float]:
    """Where a run's accuracy variance comes from: ``groups`` are accuracies of runs that differ only in the seed
    (one list per configuration), ``n_questions`` the questions each run answered.

    Evaluation sampling: a trained model answers a question right or wrong (greedy decoding), so its accuracy on n
    questions drawn from the same generator varies binomially, p(1 − p)/n (averaged over the runs). Training seed:
    the variance of the accuracy across seeds on the same questions (pooled within configurations, its df the
    seeds less one per configuration). Their sum is the variance of one run's accuracy; ``share_evaluation`` is
    the first's share. ``p_seed``: whether the seeds spread more than the binomial alone would (χ², one-sided)."""
    from scipy import stats

    df = sum(len(g) - 1 for g in groups if len(g) > 1)
    if df == 0:
        return {"df": 0.0, "total": math.nan, "evaluation": math.nan, "seed": math.nan, "share_evaluation": math.nan,
                "p_seed": math.nan}
    ss = sum(sum((x - sum(g) / len(g)) ** 2 for x in g) for g in groups if len(g) > 1)
    binom = [x * (1 - x) / n for g, ns in zip(groups, n_questions) if len(g) > 1 for x, n in zip(g, ns)]
    seed, evaluation = ss / df, sum(binom) / len(binom)
    total = seed + evaluation
    share = evaluation / total if total > 0 else math.nan
    p_seed = float(stats.chi2.sf(ss / evaluation, df)) if evaluation > 0 else math.nan
    return {"df": float(df), "total": total, "evaluation": evaluation, "seed": seed, "share_evaluation": share,
            "p_seed": p_seed}


def questions_behind(values: list[float], limit: int = 2000) -> int | None:
    """The smallest number of questions n that makes every accuracy in ``values`` a whole count k/n (for runs that
    did not record n); None when none up to ``limit`` does."""
    for n in range(1, limit + 1):
        if all(abs(v * n - round(v * n)) < 1e-6 for v in values):
            return n
    return None
