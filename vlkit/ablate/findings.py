"""Findings: a study's expectations (vlkit/ablate/expect.py) judged on its runs with paired statistics.

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
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from vlkit.ablate.expect import (PLAIN_METRICS, Comparison, Expectation, ExpectationError, Trend, parse_expectation,
                                 resolve)
from vlkit.ablate.pairing import pairs
from vlkit.ablate.stats import ALPHA, POWER, PairedStat, holm, number, paired_stat, seeds_needed

MAX_SEEDS = 1000  # a power note asking for more seeds than this says "no practical number" instead
Verdict = Literal["supported", "contradicted", "inconclusive", "not tested"]


@dataclass(kw_only=True)
class Finding:
    """One expectation's verdict with its numbers (all fields by keyword)."""

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


def fmt_effect(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{round(x, 3) + 0.0:+.3f}"  # + 0.0: no "-0.000"


def fmt_p(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3g}"


def _ci(stat: PairedStat) -> str:
    return "no CI (fewer than 2 pairs)" if math.isnan(stat.ci_low) else f"95% CI {fmt_effect(stat.ci_low)} to {fmt_effect(stat.ci_high)}"


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
               f"{fmt_effect(stat.effect)}"
    else:
        n = seeds_needed(stat.sd, stat.effect, stat.settings, ALPHA / family, POWER)
        level = f"α = 0.05/{family}, the strictest level Holm can apply" if family > 1 else "α = 0.05"
        what = f"detect the observed effect {fmt_effect(stat.effect)} with 80% power at {level}"
    if n is None or n > MAX_SEEDS:
        return (f"Power: the observed effect is {fmt_effect(stat.effect)} with SD {stat.sd:.3f} of paired differences; "
                f"no practical number of seeds (≤ {MAX_SEEDS:,}) resolves it — state the smallest effect that matters "
                "and size the study for it.")
    return (f"Power: about {n} seeds per arm{per} would {what}, given the observed SD {stat.sd:.3f} of paired "
            f"differences (paired t; now {stat.n} pairs).")


def _comparison_sentence(exp: Comparison, stat: PairedStat, verdict: Verdict, p_holm: float) -> str:
    eff = f"{exp.a} − {exp.b} = {fmt_effect(stat.effect)} on {exp.metric} ({_ci(stat)}, {stat.n} pairs"
    if exp.op == "~":
        where = {"supported": f"the whole CI lies inside ±{exp.margin:g}, so {exp.a} and {exp.b} are equivalent",
                 "contradicted": f"the whole CI lies outside ±{exp.margin:g}, so they differ by more than the margin",
                 "inconclusive": f"the CI crosses ±{exp.margin:g}, so the data cannot tell equivalence from a "
                                 "difference"}[verdict]
        return f"{verdict.capitalize()}: {eff}); {where}."
    word = "higher" if exp.op == ">" else "lower"
    if verdict == "supported":
        why = f"{exp.a} is {word} than {exp.b} as expected (Holm p = {fmt_p(p_holm)})"
    elif verdict == "contradicted":
        why = f"{exp.a} is significantly {'lower' if exp.op == '>' else 'higher'}, the opposite of the expectation " \
              f"(Holm p = {fmt_p(p_holm)})"
    elif stat.n > 1 and stat.sd == 0 and stat.effect == 0:
        why = "every pair is exactly equal, so there is no difference to test"
    else:
        why = f"not significant after Holm correction (p = {fmt_p(p_holm)}), so the direction is not established"
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
    return Finding(key=exp.key, text=exp.text, kind=kind, metric=exp.metric, axis=exp.axis, verdict=verdict,
                   sentence=_comparison_sentence(exp, stat, verdict, p_holm), effect=stat.effect,
                   ci_low=stat.ci_low, ci_high=stat.ci_high, p=_expectation_p(stat), p_holm=p_holm, n_pairs=stat.n,
                   margin=exp.margin, power_note=note)


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
    parts = ", ".join(f"{s.b}→{s.a} {fmt_effect(s.effect)}" for s, _ in steps)
    rise = "rises" if sign > 0 else "falls"
    knee = f" up to {exp.knee}" if exp.knee else ""
    flat = f" and stays within ±{exp.flat_margin:g} after it" if exp.flat_margin is not None else ""
    claim = f"{exp.metric} {rise} with {exp.axis}{knee}{flat}"
    if verdict == "supported":
        sentence = f"Supported: {claim} (steps {parts}; trend Holm p = {fmt_p(p_holm)})."
    elif verdict == "contradicted":
        bad = [f"{s.b}→{s.a}" for (s, _), v in zip(steps, verdicts) if v == "contradicted"]
        sentence = f"Contradicted: the expectation that {claim} fails at step(s) {', '.join(bad)} (steps {parts})."
    else:
        sentence = (f"Inconclusive: the data neither establish nor refute that {claim} (steps {parts}; trend Holm "
                    f"p = {fmt_p(p_holm)}).")
    note = None
    if verdict == "inconclusive" and decide is not None:
        s, m = steps[decide]
        note = f"Weakest step {s.b}→{s.a}. " + _power_note(s, m, family)
    d = steps[decide][0] if decide is not None else None
    return Finding(key=exp.key, text=exp.text, kind="trend", metric=exp.metric, axis=exp.axis, verdict=verdict,
                   sentence=sentence, effect=d.effect if d else None, ci_low=d.ci_low if d else None,
                   ci_high=d.ci_high if d else None, p=_expectation_p(steps) if steps else None, p_holm=p_holm,
                   n_pairs=min((s.n for s, _ in steps), default=0), margin=exp.flat_margin, power_note=note,
                   steps=step_rows)


def measured_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Metric columns with a number in at least one finished run (what an expectation can be tested on)."""
    cols: list[str] = []
    for r in rows:
        if r.get("status") != "finished":
            continue
        for k, v in r.items():
            if (k in PLAIN_METRICS or k.startswith("acc/")) and k not in cols and number(v) is not None:
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
            untested[key] = Finding(key=key, text=str(entry), kind="unread", metric="", axis=None,
                                    verdict="not tested", sentence=f"Not tested: {exc}.")
            continue
        try:
            if not columns:
                raise ExpectationError("no run of the study finished with a measured metric")
            testable.append(resolve(exp, axes, columns=columns))
        except ExpectationError as exc:
            kind = "trend" if isinstance(exp, Trend) else ("equivalence" if exp.op == "~" else "comparison")
            untested[key] = Finding(key=key, text=exp.text, kind=kind, metric=exp.metric,
                                    axis=getattr(exp, "axis", None), verdict="not tested",
                                    sentence=f"Not tested: {exc}.")
    judged = {f.key: f for f in judge(testable, rows, list(axes))}
    return [judged.get(f"expect[{i}]") or untested[f"expect[{i}]"] for i in range(len(entries))]


def findings_json(findings: list[Finding]) -> dict[str, Any]:
    """findings.json: every finding with its numbers, and the rules they were judged by."""
    return {"alpha": ALPHA, "power": POWER, "ci_level": 0.95,
            "holm_family": sum(f.verdict != "not tested" for f in findings),
            "pairing": "by seed within each setting of the grid's other axes; pairs pooled across settings",
            "effect": "mean of (a - b) over pairs; trends: the deciding step (largest p), later - earlier",
            "findings": [f.to_dict() for f in findings]}
