"""Findings: a study's expectations (vlkit/ablate/expect.py) judged on its runs with paired statistics.

Statistics (vlkit/ablate/contrast.py makes each contrast, vlkit/ablate/stats.py does the arithmetic):

- **Pairing.** The two arms are paired by seed within each setting of the grid's other axes: a pair is two runs
  that differ only in the compared axis; pairs from every setting are pooled. Runs that are not finished, or lack
  the metric, drop out with their partner.
- **Analysis.** When every paired run kept its answers (``predictions_<stage>.jsonl``) and the metric is an
  accuracy, the contrast is **question level**: each question's answer in arm a minus arm b, within each seed
  pair, over the questions both answered; the effect is their mean (the same number as the run-level mean) and its
  variance counts seeds and questions as random (crossed seed × question variance components, t with
  Satterthwaite df). Otherwise **run level**: the paired t-test over seeds. findings.json and the report name the
  analysis each finding used. When every seed pair differs by exactly the same amount (e.g. both arms at 1.000 in
  every seed), the run level has no spread to estimate its noise from: no interval, p n/a, inconclusive. The
  question level has exact bounds for its two such tables, no answer differing and every answer differing the same
  way (vlkit/ablate/stats.py, CrossedStat).
- **Comparisons** ``>`` / ``<``: effect = mean of (a − b), its 95% interval, two-sided p. Supported when the
  Holm-corrected p < α = 0.05 and the effect has the expected sign; contradicted when it is < α with the opposite
  sign; inconclusive otherwise.
- **Equivalence** ``~`` (±m): two one-sided tests at α, shown with the 90% (1 − 2α) interval. The expectation's
  p is the TOST p when the estimate lies inside ±m and the non-equivalence p (one-sided, beyond the nearer bound)
  when it lies outside; Holm-corrected with the others. Supported when the Holm p < α and the estimate is inside,
  contradicted when the Holm p < α and it is outside, inconclusive otherwise.
- **Non-inferiority** ``>=`` (±m): a is not worse than b by more than m, the one-sided test of a − b > −m at α,
  shown with the 90% interval (its lower end above −m is the same decision); ``<=`` mirrors it (a − b < +m). The
  expectation's p is that one-sided p when the estimate lies above −m, else the one-sided p of a − b < −m.
  Supported when the Holm p < α and the estimate is above −m, contradicted when the Holm p < α and it is below,
  inconclusive otherwise.
- **Trends** as planned contrasts: the knee (the last value without ``up to``) against the first value, in the
  stated direction; with ``then flat (±m)`` each later value against the knee, an equivalence within ±m. The steps
  in between are not tested. The trend claims all its contrasts at once, so its p is their largest claim p (an
  intersection-union test). Supported when that p, Holm-corrected across the study's expectations, is < α;
  contradicted when a contrast goes significantly the other way (the rise with the wrong sign, or a later value
  beyond ±m; Holm across the trend's contrasts); inconclusive otherwise.
- **Holm** across all of a study's expectations (step-down, family-wise error 5%).
- **Power note** (inconclusive verdicts), one line: seeds per arm that would settle it at 80% power at the
  strictest level Holm may apply (α / number of tested expectations), divided over the settings of the other axes.
  Run level: paired t (noncentral t) on the observed SD of paired differences. Question level: the crossed
  variance components at the questions the runs answer now, and at ten times as many (questions are cheap, seeds
  are not). ``~`` with the estimate inside ±m: δ = m, a true difference of 0, 90% per one-sided test; outside:
  δ = |effect| − m. ``>=`` with the estimate above −m: δ = m, a true difference of 0, one-sided at α; below:
  δ = the estimate's distance past −m. A trend's note is for its weakest contrast. Planning arithmetic on noisy
  estimates.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from vlkit.ablate.contrast import (QUESTION_METHOD, RUN_LEVEL_METHOD, Contrast, claim_p, contrast,
                                   noninferior_estimate, seeds_for)
from vlkit.ablate.expect import (NONINFERIOR, PLAIN_METRICS, Comparison, Expectation, ExpectationError, Trend,
                                 parse_expectation, resolve)
from vlkit.ablate.stats import ALPHA, POWER, holm, number

MAX_SEEDS = 1000  # a power note asking for more seeds than this says "no practical number" instead
Verdict = Literal["supported", "contradicted", "inconclusive", "not tested"]


@dataclass(kw_only=True)
class Finding:
    """One expectation's verdict with its numbers (all fields by keyword)."""

    key: str
    text: str
    kind: str  # comparison, equivalence, non-inferiority, trend (or unread: an entry the report could not test)
    metric: str
    axis: str | None
    verdict: Verdict
    sentence: str
    effect: float | None = None  # comparisons: a − b; trends: the deciding contrast
    ci_low: float | None = None
    ci_high: float | None = None
    ci_level: float = 0.95  # 0.90 for an equivalence or non-inferiority (one-sided tests at α = 0.05)
    p: float | None = None  # the expectation's claim p before correction (module docstring)
    p_holm: float | None = None
    n_pairs: int = 0
    questions: int = 0  # question level: questions per pair; 0 at run level
    method: str = "run"  # "question" or "run" (contrast.py)
    margin: float | None = None
    power_note: str | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)  # a trend's planned contrasts

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def finding_kind(exp: Expectation) -> str:
    if isinstance(exp, Trend):
        return "trend"
    return {"~": "equivalence", ">=": "non-inferiority", "<=": "non-inferiority"}.get(exp.op, "comparison")


def contrast_verdict(c: Contrast, op: str, p_holm: float) -> Verdict:
    """The verdict rules of the module docstring, for one comparison, equivalence or non-inferiority."""
    if c.n < 2 or math.isnan(p_holm) or p_holm >= ALPHA:
        return "inconclusive"
    if op == "~":
        assert c.margin is not None
        return "supported" if abs(c.effect) < c.margin else "contradicted"
    if op in NONINFERIOR:
        return "supported" if noninferior_estimate(c) else "contradicted"
    expected = 1 if op == ">" else -1
    return "supported" if expected * c.effect > 0 else "contradicted"


def trend_contrasts(exp: Trend, rows: list[dict[str, Any]], answers: dict[str, Any] | None,
                    axes: list[str]) -> list[Contrast]:
    """The trend's planned contrasts: knee − first (no margin), then each later value − knee (± the flat margin)."""
    values = list(exp.values)
    knee = exp.knee if exp.knee is not None else values[-1]
    out = [contrast(rows, answers, axes, exp.axis, knee, values[0], exp.metric)]
    if exp.flat_margin is not None:
        out += [contrast(rows, answers, axes, exp.axis, v, knee, exp.metric, exp.flat_margin)
                for v in values[values.index(knee) + 1:]]
    return out


def fmt_effect(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{round(x, 3) + 0.0:+.3f}"  # + 0.0: no "-0.000"


def fmt_p(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3g}"


def _no_spread(c: Contrast) -> bool:
    """Run level, and every seed pair differs by the same amount: the noise is not estimated (no CI, no p)."""
    return c.method == "run" and c.n > 1 and c.sd == 0


def _ci(c: Contrast) -> str:
    if c.margin is not None:
        lo, hi, level = c.ci90_low, c.ci90_high, "90%"
    else:
        lo, hi, level = c.ci_low, c.ci_high, "95%"
    if math.isnan(lo):
        return "no CI (the paired differences have no spread)" if _no_spread(c) else "no CI (fewer than 2 pairs)"
    return f"{level} CI {fmt_effect(lo)} to {fmt_effect(hi)}"


NO_SPREAD = ("every seed pair differs by exactly this amount, so the run-level test has no spread to estimate its "
             "noise from and cannot conclude; the runs' answers (predictions.jsonl) would allow the question-level "
             "analysis")


def _size(c: Contrast) -> str:
    q = f" × {c.questions} questions" if c.method == "question" else ""
    exact = (f", no answer differs between the arms: exact bound for 0 of {c.questions} questions differing"
             if c.crossed is not None and c.crossed.identical else
             f", every question differs the same way in every seed: exact sign bound over {c.questions} questions"
             if c.crossed is not None and c.crossed.unanimous else "")
    return f"{c.n} pairs{q}, {'question' if c.method == 'question' else 'run'} level{exact}"


def _count(k: int | None) -> str:
    return f"about {k}" if k is not None and k <= MAX_SEEDS else f"no practical number (≤ {MAX_SEEDS:,})"


def _power_note(c: Contrast, family: int) -> str:
    """One line: seeds per arm that would settle an inconclusive verdict (module docstring, Power note)."""
    if c.n < 2:
        return (f"Power: {c.n} pair(s); at least 2 seeds per arm are needed to estimate a spread, then "
                "the spread of the paired differences says how many more.")
    if _no_spread(c):
        return (f"Power: the {c.n} paired differences are all {fmt_effect(c.effect)} (SD 0), so the run level cannot "
                "size the study; more seeds, or runs that keep their answers (question level), would.")
    alpha = ALPHA / family
    level = f"α = 0.05/{family}, the strictest level Holm can apply" if family > 1 else "α = 0.05"
    if c.side and c.margin is not None:
        side = ">=" if c.side > 0 else "<="
        if noninferior_estimate(c):
            delta, test_alpha, power = c.margin, 2 * alpha, POWER  # one-sided at alpha = two-sided at 2 alpha
            what = (f"show {c.a} {side} {c.b} within {c.margin:g} (the {100 - 200 * alpha:.3g}% CI clear of "
                    f"{fmt_effect(-c.side * c.margin)}) with 80% power if the true difference were 0 ({level})")
        else:
            delta, test_alpha, power = -(c.side * c.effect + c.margin), 2 * alpha, POWER  # distance past −m
            what = (f"show {c.a} is {'lower' if c.side > 0 else 'higher'} than {c.b} by more than {c.margin:g} with "
                    f"80% power if the difference were the observed {fmt_effect(c.effect)} ({level})")
    elif c.margin is not None and abs(c.effect) < c.margin:
        # both one-sided tests at alpha (a two-sided test at 2 alpha), 90% power each: >= 80% for the pair
        delta, test_alpha, power = c.margin, 2 * alpha, 1 - (1 - POWER) / 2
        what = f"put the {100 - 200 * alpha:.3g}% CI inside ±{c.margin:g} with 80% probability if the true " \
               f"difference were 0 ({level})"
    elif c.margin is not None:
        delta, test_alpha, power = abs(c.effect) - c.margin, 2 * alpha, POWER
        what = f"show the difference lies beyond ±{c.margin:g} with 80% power if it were the observed " \
               f"{fmt_effect(c.effect)} ({level})"
    else:
        delta, test_alpha, power = c.effect, alpha, POWER
        what = f"detect the observed effect {fmt_effect(c.effect)} with 80% power at {level}"
    per = f" (× {c.settings} settings of the other axes)" if c.settings > 1 else ""
    n = seeds_for(c, delta, test_alpha, power)
    if c.method == "question" and c.crossed is not None:
        more = seeds_for(c, delta, test_alpha, power, questions=10 * c.questions)
        cs = c.crossed
        basis = (f"given the observed variance components (seed {cs.var_seed:.2g}, question {cs.var_question:.2g}, "
                 f"evaluation {cs.var_residual:.2g}; now {c.n} pairs × {c.questions} questions)")
        return (f"Power: to {what}: {_count(n)} seeds per arm{per} at {c.questions} questions per pair, "
                f"{_count(more)} at {10 * c.questions}, {basis}.")
    if n is None or n > MAX_SEEDS:
        return (f"Power: the observed effect is {fmt_effect(c.effect)} with SD {c.sd:.3f} of paired differences; "
                f"no practical number of seeds (≤ {MAX_SEEDS:,}) resolves it — state the smallest effect that matters "
                "and size the study for it.")
    return (f"Power: about {n} seeds per arm{per} would {what}, given the observed SD {c.sd:.3f} of paired "
            f"differences (paired t; now {c.n} pairs).")


def _comparison_sentence(exp: Comparison, c: Contrast, verdict: Verdict, p_holm: float) -> str:
    eff = f"{exp.a} − {exp.b} = {fmt_effect(c.effect)} on {exp.metric} ({_ci(c)}, {_size(c)}"
    if exp.op == "~":
        where = {"supported": f"both one-sided tests place it inside ±{exp.margin:g} (Holm p = {fmt_p(p_holm)}), "
                              f"so {exp.a} and {exp.b} are equivalent",
                 "contradicted": f"it lies beyond ±{exp.margin:g} (Holm p = {fmt_p(p_holm)}), so they differ by more "
                                 "than the margin",
                 "inconclusive": NO_SPREAD if _no_spread(c) else
                                 f"after Holm correction (p = {fmt_p(p_holm)}) the data cannot tell equivalence within "
                                 f"±{exp.margin:g} from a larger difference"}[verdict]
        return f"{verdict.capitalize()}: {eff}); {where}."
    if exp.op in NONINFERIOR:
        bound, worse = fmt_effect(-c.side * c.margin), "lower" if c.side > 0 else "higher"
        where = {"supported": f"the one-sided test places it {'above' if c.side > 0 else 'below'} {bound} (Holm p = "
                              f"{fmt_p(p_holm)}), so {exp.a} is not {worse} than {exp.b} by more than {exp.margin:g}",
                 "contradicted": f"{exp.a} is {worse} than {exp.b} by more than {exp.margin:g} (Holm p = "
                                 f"{fmt_p(p_holm)})",
                 "inconclusive": NO_SPREAD if _no_spread(c) else
                                 f"after Holm correction (p = {fmt_p(p_holm)}) the data cannot rule out {exp.a} "
                                 f"being {worse} than {exp.b} by more than {exp.margin:g}"}[verdict]
        return f"{verdict.capitalize()}: {eff}); {where}."
    word = "higher" if exp.op == ">" else "lower"
    if verdict == "supported":
        why = f"{exp.a} is {word} than {exp.b} as expected (Holm p = {fmt_p(p_holm)})"
    elif verdict == "contradicted":
        why = f"{exp.a} is significantly {'lower' if exp.op == '>' else 'higher'}, the opposite of the expectation " \
              f"(Holm p = {fmt_p(p_holm)})"
    elif _no_spread(c):
        why = NO_SPREAD
    else:
        why = f"not significant after Holm correction (p = {fmt_p(p_holm)}), so the direction is not established"
    return f"{verdict.capitalize()}: {eff}); {why}."


def judge(expectations: list[Expectation], rows: list[dict[str, Any]], axes: list[str],
          answers: dict[str, Any] | None = None) -> list[Finding]:
    """Findings for resolved expectations over result rows (report rows or results.csv rows) and, where the runs
    kept them, their answers (results.load_answers), Holm-corrected across all of them."""
    made: dict[str, Any] = {}
    for exp in expectations:
        if isinstance(exp, Trend):
            made[exp.key] = trend_contrasts(exp, rows, answers, axes)
        else:
            made[exp.key] = contrast(rows, answers, axes, exp.axis, exp.a, exp.b, exp.metric,  # type: ignore[arg-type]
                                     exp.margin, NONINFERIOR.get(exp.op, 0))
    keys = list(made)
    adjusted = dict(zip(keys, holm([_expectation_p(made[k]) for k in keys])))
    return [_judge_trend(exp, made[exp.key], adjusted[exp.key], len(keys)) if isinstance(exp, Trend)
            else _judge_comparison(exp, made[exp.key], adjusted[exp.key], len(keys)) for exp in expectations]


def _expectation_p(made: Contrast | list[Contrast]) -> float:
    if isinstance(made, Contrast):
        return claim_p(made)
    ps = [c.p if c.margin is None else c.p_tost for c in made]
    return float("nan") if not ps or any(p is None or math.isnan(p) for p in ps) else max(ps)  # type: ignore


def _judge_comparison(exp: Comparison, c: Contrast, p_holm: float, family: int) -> Finding:
    verdict = contrast_verdict(c, exp.op, p_holm)
    eq = exp.margin is not None  # equivalence or non-inferiority: one-sided tests at α, the 90% CI
    return Finding(key=exp.key, text=exp.text, kind=finding_kind(exp), metric=exp.metric,
                   axis=exp.axis, verdict=verdict, sentence=_comparison_sentence(exp, c, verdict, p_holm),
                   effect=c.effect, ci_low=c.ci90_low if eq else c.ci_low, ci_high=c.ci90_high if eq else c.ci_high,
                   ci_level=1 - 2 * ALPHA if eq else 0.95, p=claim_p(c), p_holm=p_holm, n_pairs=c.n,
                   questions=c.questions, method=c.method, margin=exp.margin,
                   power_note=_power_note(c, family) if verdict == "inconclusive" else None)




def _trend_verdicts(exp: Trend, made: list[Contrast], p_holm: float) -> tuple[Verdict, list[Verdict]]:
    """The trend's verdict and each contrast's (module docstring, Trends)."""
    sign = 1 if exp.direction == "increases" else -1
    against = [c.p if c.margin is None else c.p_outside for c in made]  # p of the contrast going the other way
    within = holm([math.nan if p is None else p for p in against])
    verdicts: list[Verdict] = []
    for c, ph in zip(made, within):
        wrong = (sign * c.effect < 0) if c.margin is None else abs(c.effect) >= c.margin
        right = (sign * c.effect > 0) if c.margin is None else abs(c.effect) < c.margin
        p_claim = c.p if c.margin is None else c.p_tost
        if c.n >= 2 and wrong and not math.isnan(ph) and ph < ALPHA:
            verdicts.append("contradicted")
        elif c.n >= 2 and right and p_claim is not None and p_claim < ALPHA:
            verdicts.append("supported")
        else:
            verdicts.append("inconclusive")
    rise_right = sign * made[0].effect > 0
    flat_inside = all(abs(c.effect) < c.margin for c in made[1:] if c.margin is not None)
    if "contradicted" in verdicts:
        return "contradicted", verdicts
    if not math.isnan(p_holm) and p_holm < ALPHA and rise_right and flat_inside:
        return "supported", verdicts
    return "inconclusive", verdicts


def _judge_trend(exp: Trend, made: list[Contrast], p_holm: float, family: int) -> Finding:
    verdict, verdicts = _trend_verdicts(exp, made, p_holm)
    ps = [c.p if c.margin is None else c.p_tost for c in made]
    # the deciding contrast: the one with the largest claim p (one without a p decides first)
    decide = max(range(len(made)), key=lambda i: math.inf if ps[i] is None or math.isnan(ps[i]) else ps[i])
    step_rows = [{"from": c.b, "to": c.a, "kind": "flat" if c.margin is not None else exp.direction,
                  "effect": c.effect, "ci_low": c.ci90_low if c.margin is not None else c.ci_low,
                  "ci_high": c.ci90_high if c.margin is not None else c.ci_high, "p": p, "n_pairs": c.n,
                  "method": c.method, "verdict": v} for c, p, v in zip(made, ps, verdicts)]
    step_rows = [{k: (None if isinstance(x, float) and math.isnan(x) else x) for k, x in r.items()} for r in step_rows]
    parts = ", ".join(f"{c.b}→{c.a} {fmt_effect(c.effect)}" for c in made)
    knee = f" up to {exp.knee}" if exp.knee else ""
    flat = f" and stays within ±{exp.flat_margin:g} of it after" if exp.flat_margin is not None else ""
    claim = f"{exp.metric} {'rises' if exp.direction == 'increases' else 'falls'} with {exp.axis}{knee}{flat}"
    if verdict == "supported":
        sentence = f"Supported: {claim} (planned contrasts {parts}; trend Holm p = {fmt_p(p_holm)})."
    elif verdict == "contradicted":
        bad = [f"{c.b}→{c.a}" for c, v in zip(made, verdicts) if v == "contradicted"]
        sentence = f"Contradicted: the expectation that {claim} fails at {', '.join(bad)} (planned contrasts {parts})."
    else:
        sentence = (f"Inconclusive: the data neither establish nor refute that {claim} (planned contrasts {parts}; "
                    f"trend Holm p = {fmt_p(p_holm)}).")
    d = made[decide]
    note = f"Weakest contrast {d.b}→{d.a}. " + _power_note(d, family) if verdict == "inconclusive" else None
    eq = d.margin is not None
    return Finding(key=exp.key, text=exp.text, kind="trend", metric=exp.metric, axis=exp.axis, verdict=verdict,
                   sentence=sentence, effect=d.effect, ci_low=d.ci90_low if eq else d.ci_low,
                   ci_high=d.ci90_high if eq else d.ci_high, ci_level=1 - 2 * ALPHA if eq else 0.95,
                   p=_expectation_p(made), p_holm=p_holm, n_pairs=min(c.n for c in made), questions=d.questions,
                   method=d.method, margin=exp.flat_margin, power_note=note, steps=step_rows)


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


def findings_for(entries: list[Any], axes: dict[str, list[Any]], rows: list[dict[str, Any]],
                 answers: dict[str, Any] | None = None) -> list[Finding]:
    """The report's Findings: every ``expect:`` entry, checked again against the grid and the metrics the runs
    produced, then judged (at question level where the runs kept ``answers``). An entry that cannot be tested (a metric no run measured) is listed as not tested, with
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
            untested[key] = Finding(key=key, text=exp.text, kind=finding_kind(exp), metric=exp.metric,
                                    axis=getattr(exp, "axis", None), verdict="not tested",
                                    sentence=f"Not tested: {exc}.")
    judged = {f.key: f for f in judge(testable, rows, list(axes), answers)}
    return [judged.get(f"expect[{i}]") or untested[f"expect[{i}]"] for i in range(len(entries))]


def findings_json(findings: list[Finding]) -> dict[str, Any]:
    """findings.json: every finding with its numbers, and the rules they were judged by."""
    return {"alpha": ALPHA, "power": POWER, "ci_level": 0.95, "equivalence_ci_level": 1 - 2 * ALPHA,
            "holm_family": sum(f.verdict != "not tested" for f in findings),
            "pairing": "by seed within each setting of the grid's other axes; pairs pooled across settings",
            "methods": {"question": QUESTION_METHOD, "run": RUN_LEVEL_METHOD},
            "effect": "mean of (a - b) over pairs; trends: the deciding planned contrast (largest p)",
            "findings": [f.to_dict() for f in findings]}
