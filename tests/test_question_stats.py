"""Question-level statistics: calibrated by simulation, and recomputed by a second, plain implementation.

The simulations draw answers from a logistic model: question q has a difficulty d_q, the run of arm x with seed k
a skill θ = shared seed part + the arm's own seed part, and P(correct) = σ(μ + θ + γ·[arm a] + u_q·(±½) − d_q),
where u_q is an arm × question interaction (questions one arm gets right more often; 0 in the simple null). The
seed SDs are fitted to the committed studies (vlkit's variance split of docs/examples); the difficulties are
N(0, 1.5²) on the logit scale (the committed runs kept no answers to fit them from: an assumption).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from vlkit.ablate.stats import (crossed_design, crossed_power, crossed_stat, crossed_stats_many, mean_squares,
                                variance_split)

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples" / "v3"  # the previous world's studies (no answers kept)


def simulate(rng, studies: int, k: int, q: int, sd_armseed: float, gamma: float = 0.0, sd_armq: float = 0.0,
             mu: float = 0.3, sd_seed: float = 0.3, tau: float = 1.5) -> np.ndarray:
    """(studies × K × Q) paired answer differences (arm a − arm b) from the logistic model above."""
    d = rng.normal(0, tau, size=(studies, 1, 1, q))
    u = rng.normal(0, sd_armq, size=(studies, 1, 1, q)) * np.array([0.5, -0.5])[None, :, None, None]
    theta = rng.normal(0, sd_seed, size=(studies, 1, k, 1)) + rng.normal(0, sd_armseed, size=(studies, 2, k, 1))
    logit = mu + theta + np.array([gamma, 0.0])[None, :, None, None] + u - d
    y = rng.random((studies, 2, k, q)) < 1 / (1 + np.exp(-logit))
    return y[:, 0].astype(float) - y[:, 1]


def fitted_seed_sd() -> float:
    """The largest seed SD of the committed studies (position_of_object), on the logit scale at its accuracy."""
    from vlkit.ablate.tables import variance_sources

    worst = 0.0
    for name in ("cls_vs_patch/seeds5", "num_tokens", "projectors", "stages"):
        rows = json.loads((EXAMPLES / name / "results.json").read_text())
        plan = json.loads((EXAMPLES / name / "plan.json").read_text())
        v = next(v for v in variance_sources(rows, plan["axes"]) if v["metric"] == "acc/position_of_object")
        vals = [r["acc/position_of_object"] for r in rows if r.get("status") == "finished"]
        p = sum(vals) / len(vals)
        worst = max(worst, math.sqrt(v["seed"]) / (p * (1 - p)))  # d logit = d p / (p (1 − p))
    return worst


def p_values(d: np.ndarray) -> np.ndarray:
    g, se, df = crossed_stats_many(d)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(se > 0, 2 * stats.t.sf(np.abs(g) / se, df), np.where(g == 0, 1.0, 0.0))


def test_many_tables_at_once_is_the_one_table_arithmetic():
    rng = np.random.default_rng(5)
    d = simulate(rng, 4, 3, 50, 0.3, sd_armq=0.4)
    g, se, df = crossed_stats_many(d)
    for i in range(4):
        one = crossed_stat(d[i])
        assert (one.effect, one.se, one.df) == pytest.approx((g[i], se[i], df[i]))
        assert one.p() == pytest.approx(p_values(d[i:i + 1])[0])


@pytest.mark.parametrize("k", [3, 5])
def test_same_recipe_false_positive_rate_at_most_6_percent(k):
    """Two arms of one recipe: 2 000 simulated studies per regime, each test at α = 0.05."""
    rng = np.random.default_rng(27 + k)
    fitted = fitted_seed_sd()
    assert 0.2 < fitted < 2.0  # position_of_object's seed SD (≈ 0.07 in accuracy) on the logit scale
    for sd_armseed, sd_armq in [(0.0, 0.0), (fitted, 0.0), (fitted, 0.5), (0.1, 0.5)]:
        p = p_values(simulate(rng, 2000, k, 50, sd_armseed, sd_armq=sd_armq))
        rate = float(np.mean(p < 0.05))
        assert rate <= 0.06, (k, sd_armseed, sd_armq, rate)


@pytest.mark.parametrize("k", [3, 5])
def test_non_inferiority_at_its_margin_rejects_at_most_6_percent(k):
    """Arm a truly worse than b by exactly the margin (a − b = −m): the one-sided test a − b > −m
    (CrossedStat.p_beyond) claims non-inferiority in at most 6% of 2 000 simulated studies per regime."""
    rng = np.random.default_rng(61 + k)
    fitted = fitted_seed_sd()
    for sd_armseed, sd_armq in [(0.0, 0.0), (fitted, 0.5)]:
        # the true a − b of a logit shift of −0.3 (about −0.06 in accuracy): the mean over many simulated answers
        margin = -float(simulate(rng, 400, 12, 100, sd_armseed, -0.3, sd_armq).mean())
        assert 0.03 < margin < 0.1
        d = simulate(rng, 2000, k, 50, sd_armseed, -0.3, sd_armq)
        g, se, df = crossed_stats_many(d)
        with np.errstate(divide="ignore", invalid="ignore"):
            p = np.where(se > 0, stats.t.sf((g + margin) / se, df), 1.0)
        for i in range(20):  # the vectorised arithmetic is p_beyond's
            one = crossed_stat(d[i]).p_beyond(-margin, 1)
            assert one == pytest.approx(p[i]) or (math.isnan(one) and se[i] == 0)
        rate = float(np.mean(p < 0.05))
        assert rate <= 0.06, (k, sd_armseed, sd_armq, rate)


def test_the_seed_only_t_test_ignores_question_variability_and_the_crossed_one_does_not():
    """Why questions count as random: with an arm × question interaction the run-level paired t-test (questions
    fixed) rejects a true null more often than α over many question sets; the crossed test holds α."""
    rng = np.random.default_rng(3)
    d = simulate(rng, 3000, 5, 50, 0.0, sd_armq=1.0)
    runs = d.mean(axis=2)
    t = runs.mean(1) / (runs.std(1, ddof=1) / math.sqrt(5))
    run_level = float(np.mean(2 * stats.t.sf(np.abs(t), 4) < 0.05))
    crossed = float(np.mean(p_values(d) < 0.05))
    assert crossed <= 0.06 and run_level > crossed + 0.02, (run_level, crossed)


def test_injected_effect_is_detected_at_the_power_the_report_predicts():
    """The power note's arithmetic (crossed_design / crossed_power on the variance components) against 2 000
    simulated studies with a known effect: the seeds it asks for give 80% ± 10% power, and so does any design."""
    rng = np.random.default_rng(11)
    q, gamma, sd_armseed, sd_armq = 100, 0.3, 0.25, 0.2
    pilot = simulate(rng, 500, 12, q, sd_armseed, gamma, sd_armq)  # the true components, from the moments
    ms = np.array([mean_squares(t) for t in pilot]).mean(axis=0)
    var_seed, var_question, var_e = (ms[0] - ms[2]) / q, (ms[1] - ms[2]) / 12, ms[2]
    delta = float(pilot.mean())
    k = crossed_design(delta, var_seed, var_question, var_e, q)
    assert k is not None and 5 <= k <= 100
    empirical = float(np.mean(p_values(simulate(rng, 2000, k, q, sd_armseed, gamma, sd_armq)) < 0.05))
    assert abs(empirical - 0.8) <= 0.10, (k, empirical)
    for k2 in (4, k // 2):
        predicted = crossed_power(delta, var_seed, var_question, var_e, k2, q)
        empirical = float(np.mean(p_values(simulate(rng, 2000, k2, q, sd_armseed, gamma, sd_armq)) < 0.05))
        assert abs(empirical - predicted) <= 0.10, (k2, predicted, empirical)


# ---- a second, plain implementation ------------------------------------------------------------------------------
def plain_crossed(table: list[list[float]]) -> dict[str, float]:
    """Effect, SE, df, 95% CI and p of a (pairs × questions) table, with loops: the moments of a two-way layout,
    the variance MS_rows/(KQ) plus (MS_cols − MS_e)/(KQ) where positive beyond float rounding (relative 1e-9, the
    rule vlkit's stats state), Satterthwaite df capped at K − 1."""
    k, q = len(table), len(table[0])
    grand = sum(sum(r) for r in table) / (k * q)
    rows = [sum(r) / q for r in table]
    cols = [sum(table[i][j] for i in range(k)) / k for j in range(q)]
    ms_r = q * sum((r - grand) ** 2 for r in rows) / (k - 1)
    ms_c = k * sum((c - grand) ** 2 for c in cols) / (q - 1)
    ms_e = sum((table[i][j] - rows[i] - cols[j] + grand) ** 2 for i in range(k) for j in range(q)) / ((k - 1) * (q - 1))
    extra = ms_c - ms_e if ms_c - ms_e > 1e-9 * max(abs(ms_c), abs(ms_e)) else 0.0  # equal up to rounding: none
    var = (ms_r + extra) / (k * q)
    if ms_e > 0 and ms_r + extra <= 1e-9 * ms_e:  # the pairs' means alike, answers not: the residual's variance
        var = ms_e / (k * q)
    if var == 0:  # every pair answered every question alike: the difference is known exactly
        return {"effect": grand, "se": 0.0, "df": k - 1, "lo": grand, "hi": grand,
                "p": 0.0 if grand != 0 else math.nan}
    denom = ms_r ** 2 / (k - 1) + ((ms_c ** 2 / (q - 1) + ms_e ** 2 / ((k - 1) * (q - 1))) if extra else 0.0)
    df = min((ms_r + extra) ** 2 / denom, k - 1) if denom > 0 else k - 1
    se = math.sqrt(var)
    half = stats.t.ppf(0.975, df) * se
    return {"effect": grand, "se": se, "df": df, "lo": grand - half, "hi": grand + half,
            "p": 2 * stats.t.sf(abs(grand) / se, df)}


def test_a_table_in_which_no_answer_differs_uses_the_exact_bound_for_zero_of_q():
    # both arms at 1.000 on 125 questions in 3 seeds: no variance to estimate; the exact bound, not p = 0
    cs = crossed_stat(np.zeros((3, 125)))
    assert cs.identical and cs.effect == 0 and cs.se == 0
    assert cs.p() == 1.0 and cs.p_outside(0.05) == 1.0
    assert cs.p_tost(0.05) == pytest.approx(0.95 ** 125)  # 0.0016: P(no question of 125 differs | |δ| >= 0.05)
    lo, hi = cs.ci(0.90)
    assert hi == pytest.approx(1 - 0.05 ** (1 / 125)) and lo == -hi and 0.023 < hi < 0.024
    assert cs.ci(0.95)[1] == pytest.approx(1 - 0.025 ** (1 / 125))
    assert cs.p_tost(0.01) > 0.05  # a margin tighter than 125 questions can resolve is not "equivalent"
    one = np.zeros((3, 125))
    one[1, 7] = 1  # one differing answer: the moments again, not the bound
    assert not crossed_stat(one).identical and crossed_stat(one).se > 0


def test_a_table_in_which_every_answer_differs_the_same_way_uses_exact_sign_bounds():
    # arm a right and b wrong on every question in every seed: the moments give se 0; not certainty either
    cs = crossed_stat(np.ones((2, 2)))
    assert cs.unanimous == 1 and not cs.identical and cs.se == 0
    assert cs.p() == pytest.approx(0.5)  # 2 questions all going a's way: 2 * 0.5^2, not significant
    assert cs.p_tost(0.05) == 1.0 and cs.p_outside(0.05) == pytest.approx(0.525 ** 2)
    lo, hi = cs.ci(0.95)
    assert hi == 1.0 and lo == pytest.approx(1 - 2 * (1 - 0.025 ** (1 / 2)))
    many = crossed_stat(-np.ones((3, 125)))
    assert many.unanimous == -1 and many.p() < 1e-30 and many.ci(0.95)[1] < -0.9
    half = crossed_stat(np.full((2, 3), 0.5))  # not an accuracy table: no sign bound, and no certainty either
    assert half.unanimous == 0 and half.se == 0 and math.isnan(half.p()) and math.isnan(half.ci()[0])
    assert math.isnan(half.p_tost(0.05)) and math.isnan(half.p_outside(0.05))


def test_equal_seed_means_with_differing_answers_keep_the_residual_variance():
    # each seed pair has one question a gets right and b wrong, a different one in each pair: the pairs' means are
    # equal (MS_rows = 0) and MS_cols < MS_e, so the moments alone give variance 0 and p = 0 for +0.1
    t = np.zeros((3, 10))
    for i in range(3):
        t[i, i] = 1
    ms_r, ms_c, ms_e = mean_squares(t)
    assert ms_r < 1e-12 and ms_c < ms_e
    cs = crossed_stat(t)
    assert cs.se == pytest.approx(math.sqrt(ms_e / 30)) and cs.df == 2
    assert cs.p() > 0.05  # +0.1 from three answers is not established
    assert plain_crossed(t.tolist())["se"] == pytest.approx(cs.se)
    g, se, df = crossed_stats_many(t[None])
    assert se[0] == pytest.approx(cs.se) and df[0] == 2
    # the same with rounding in the means: 11 questions (row means 1/11, not exact in binary)
    t = np.zeros((3, 11))
    for i in range(3):
        t[i, i] = 1
    assert crossed_stat(t).se == pytest.approx(math.sqrt(mean_squares(t)[2] / 33))


def write_study(out: Path, rng, effect: float) -> None:
    """An ablation directory with predictions: 2 arms × 4 seeds × 2 types × 30 questions."""
    runs = []
    qids = [(f"q{t}{i}", t) for t in ("where", "count") for i in range(30)]
    for arm, shift in (("cls", 0.0), ("patch", effect)):
        for seed in range(4):
            rid = f"tokens-{arm}_seed-{seed}"
            runs.append({"id": rid, "seed": seed, "axes": {"tokens": arm}, "overrides": [], "mapping": None,
                         "skipped": None})
            rd = out / "runs" / rid
            rd.mkdir(parents=True)
            rows = [{"id": qid, "question_type": t, "reference": "a", "prediction": "b",
                     "correct": bool(rng.random() < (0.4 + (shift if t == "where" else 0.0)))} for qid, t in qids]
            (rd / "predictions_instruct.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            by_type = {t: sum(r["correct"] for r in rows if r["question_type"] == t) / 30 for t in ("where", "count")}
            (rd / "summary.json").write_text(json.dumps({
                "status": "finished", "num_image_tokens": 1, "wall_time_s": 1.0,
                "stages": {"instruct": {"accuracy": sum(r["correct"] for r in rows) / 60, "val_loss": 0.5,
                                        "accuracy_by_type": by_type, "count_by_type": {"where": 30, "count": 30},
                                        "trainable_params": 10, "tokens_per_s": 1.0}}}))
    (out / "plan.json").write_text(json.dumps({
        "recipe": "synthetic", "recipe_path": "s.yaml", "axes": ["tokens"], "seeds": [0, 1, 2, 3],
        "base_overrides": [], "num_patches": 64, "command": "vlkit ablate s.yaml", "runs": runs,
        "expect": ["patch > cls on acc/where", "cls ~ patch on acc/count (±0.15)"]}))


def test_question_level_findings_agree_with_a_plain_recomputation_from_predictions(tmp_path):
    from vlkit.ablate.report import write_report

    write_study(tmp_path, np.random.default_rng(0), 0.3)
    write_report(tmp_path)
    found = {f["key"]: f for f in json.loads((tmp_path / "findings.json").read_text())["findings"]}
    report = (tmp_path / "report.md").read_text()
    assert "Analysis: **question level**" in report and "## Where the variance comes from" in report

    def table(qtype: str) -> list[list[float]]:
        answers = {}
        for rd in (tmp_path / "runs").iterdir():
            lines = (rd / "predictions_instruct.jsonl").read_text().splitlines()
            answers[rd.name] = {r["id"]: float(r["correct"]) for r in map(json.loads, lines)
                                if r["question_type"] == qtype}
        ids = sorted(answers["tokens-cls_seed-0"])
        return [[answers[f"tokens-patch_seed-{s}"][i] - answers[f"tokens-cls_seed-{s}"][i] for i in ids]
                for s in range(4)]

    where = plain_crossed(table("where"))
    count = plain_crossed([[-x for x in row] for row in table("count")])  # cls − patch
    se, df = count["se"], count["df"]
    tost = max(stats.t.sf((count["effect"] + 0.15) / se, df), stats.t.sf((0.15 - count["effect"]) / se, df))
    outside = stats.t.sf((abs(count["effect"]) - 0.15) / se, df)
    claim = tost if abs(count["effect"]) < 0.15 else outside
    lo90, hi90 = (count["effect"] + s * stats.t.ppf(0.95, df) * se for s in (-1, 1))
    p_sorted = sorted([where["p"], claim])
    holm = {p_sorted[0]: min(1, 2 * p_sorted[0])}
    holm[p_sorted[1]] = max(holm[p_sorted[0]], min(1, p_sorted[1]))
    f0, f1 = found["expect[0]"], found["expect[1]"]
    assert f0["method"] == f1["method"] == "question" and f0["questions"] == 30 and f0["n_pairs"] == 4
    got = [f0["effect"], f0["ci_low"], f0["ci_high"], f0["p"], f0["p_holm"],
           f1["effect"], f1["ci_low"], f1["ci_high"], f1["p"], f1["p_holm"]]
    want = [where["effect"], where["lo"], where["hi"], where["p"], holm[where["p"]],
            count["effect"], lo90, hi90, claim, holm[claim]]
    assert [round(x, 3) for x in got] == [round(x, 3) for x in want]
    # the run-level numbers of the same study (answers set aside) have the same effect
    from vlkit.ablate.findings import findings_for

    rows = json.loads((tmp_path / "results.json").read_text())
    run_level = findings_for(["patch > cls on acc/where"], {"tokens": ["cls", "patch"]}, rows)[0]
    assert run_level.method == "run" and round(run_level.effect, 9) == round(where["effect"], 9)


def test_a_study_without_answers_says_it_is_analysed_at_run_level(tmp_path):
    from vlkit.ablate.report import write_report

    write_study(tmp_path, np.random.default_rng(1), 0.3)
    for f in (tmp_path / "runs").glob("*/predictions_instruct.jsonl"):
        f.unlink()
    write_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "Analysis: **run level** — none of the 8 finished runs has its answers" in report
    assert all(f["method"] == "run" for f in json.loads((tmp_path / "findings.json").read_text())["findings"])


def test_variance_split_binomial_against_seed():
    # no seed spread at all: every share is evaluation sampling
    v = variance_split([[0.5, 0.5, 0.5]], [[50, 50, 50]])
    assert v["evaluation"] == pytest.approx(0.005) and v["seed"] == 0 and v["share_evaluation"] == 1.0
    # seed spread SD 0.1 against a binomial SD 0.0707: a third of the variance is evaluation
    v = variance_split([[0.4, 0.5, 0.6]], [[50, 50, 50]])
    assert v["seed"] == pytest.approx(0.01)
    binom = (0.4 * 0.6 + 0.25 + 0.6 * 0.4) / 3 / 50
    assert v["evaluation"] == pytest.approx(binom) and v["share_evaluation"] == pytest.approx(binom / (binom + 0.01))
    assert v["p_seed"] == pytest.approx(stats.chi2.sf(0.02 / binom, 2))


def test_seeds_added_after_a_report_make_the_findings_exploratory(tmp_path):
    from vlkit.ablate.plan import seed_extensions
    from vlkit.ablate.report import write_report

    write_study(tmp_path, np.random.default_rng(2), 0.2)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert seed_extensions(tmp_path, [0, 1, 2, 3, 4, 5]) == []  # no report yet: planned seeds, not a second look
    write_report(tmp_path)
    assert "Exploratory" not in (tmp_path / "report.md").read_text()
    assert seed_extensions(tmp_path, [0, 1, 2, 3]) == []  # the same seeds again
    extended = seed_extensions(tmp_path, [0, 1, 2, 3, 4, 5])
    assert extended == [{"from": 4, "to": 6, "seeds_before": [0, 1, 2, 3]}]
    (tmp_path / "plan.json").write_text(json.dumps({**plan, "seeds": [0, 1, 2, 3, 4, 5], "extended": extended}))
    write_report(tmp_path)
    assert "**Exploratory.** Seeds were added after a report of this study had been written (seeds 4 → 6)" in \
        (tmp_path / "report.md").read_text()
    assert "exploratory" in json.loads((tmp_path / "findings.json").read_text())
    assert seed_extensions(tmp_path, [0, 1, 2, 3, 4, 5]) == extended  # kept by later plans


# ---- the committed studies with kept answers (v4, v5 and v6 worlds), recomputed from them ---------------------
STUDIES_WITH_ANSWERS = Path(__file__).resolve().parents[1] / "docs" / "examples"


def committed_studies_with_answers() -> list[Path]:
    # studies with kept answers: the shipped world's (v8/), v7's (v7/), v6's and those of v4 not yet rerun (*/),
    # v4's rerun ones (v4/), earlier defaults on v4 (v4_no_cells/, v4_patch64/) and on v6 (v6_no_norm/), the
    # default's on the v5 preset (v5/)
    plans = [*STUDIES_WITH_ANSWERS.glob("*/plan.json"), *STUDIES_WITH_ANSWERS.glob("v4/*/plan.json"),
             *STUDIES_WITH_ANSWERS.glob("v4_*/*/plan.json"), *STUDIES_WITH_ANSWERS.glob("v5/*/plan.json"),
             *STUDIES_WITH_ANSWERS.glob("v6_*/*/plan.json"), *STUDIES_WITH_ANSWERS.glob("v7/*/plan.json"),
             *STUDIES_WITH_ANSWERS.glob("v8/*/plan.json")]
    return sorted(p.parent for p in plans if (p.parent / "runs").is_dir())


def plain_study_findings(study: Path) -> list[dict[str, float]]:
    """Each expectation's effect, p and Holm p from the runs' predictions files alone: question-level tables built
    here, ``plain_crossed`` for the moments, TOST written out, Holm with a loop; trends as their planned contrasts
    (knee − first, then each later value − knee within ±m; the trend's p is its largest claim p)."""
    plan = json.loads((study / "plan.json").read_text())

    def label(v):  # an axis value as expectations name it: a list (stages: [align, instruct]) joined by "+"
        return "+".join(map(str, v)) if isinstance(v, list) else str(v)

    runs = {}
    for r in plan["runs"]:
        rd = study / "runs" / r["id"]
        if r.get("skipped") or not (rd / "predictions_instruct.jsonl").exists():
            continue
        rows = [json.loads(x) for x in (rd / "predictions_instruct.jsonl").read_text().splitlines()]
        runs[r["id"]] = ({k: label(v) for k, v in r["axes"].items()}, r["seed"],
                         {x["id"]: (x["question_type"], float(x["correct"])) for x in rows})

    def arm(axis: str, value: str) -> dict[tuple, dict]:
        # a cell ("projector=linear,num_image_tokens=16", axis "projector,num_image_tokens") fixes several axes
        fixed = dict(part.split("=") for part in value.split(",")) if "," in axis else {axis: value}
        return {(tuple(sorted((k, v) for k, v in ax.items() if k not in fixed)), seed): ans
                for ax, seed, ans in runs.values() if all(ax.get(k) == v for k, v in fixed.items())}

    def table(axis: str, a: str, b: str, metric: str) -> list[list[float]]:
        qtype = None if metric == "accuracy" else metric.removeprefix("acc/")
        ra, rb = arm(axis, a), arm(axis, b)
        keys = sorted(set(ra) & set(rb))
        qs = sorted(set.intersection(*[{q for q, (t, _) in side[k].items() if qtype in (None, t)}
                                       for k in keys for side in (ra, rb)]))
        return [[ra[k][q][1] - rb[k][q][1] for q in qs] for k in keys]

    def moments(axis: str, a: str, b: str, metric: str, margin: float | None, side: int = 0) -> dict[str, float]:
        t = table(axis, a, b, metric)
        c = plain_crossed(t)
        if side:  # non-inferiority: side·(a − b) > −margin, one-sided; else the p of falling short by more
            cells = {x for row in t for x in row}
            if cells == {0}:  # no answer differs: P(0 of Q questions differ | δ beyond the margin)
                c["claim"] = (1 - margin) ** len(t[0])
            elif len(cells) == 1 and cells <= {1, -1}:  # every answer differs one way: exact sign bound
                c["claim"] = ((1 + cells.pop() * -side * margin) / 2) ** len(t[0])
            elif c["se"] == 0:
                c["claim"] = math.nan
            else:
                c["claim"] = stats.t.sf(abs(side * c["effect"] + margin) / c["se"], c["df"])
            return c
        if all(x == 0 for row in t for x in row):  # no answer differs: P(0 of Q questions differ | |δ| >= m)
            c["p"] = 1.0
            if margin is not None:
                c["tost"] = c["claim"] = (1 - margin) ** len(t[0])
            else:
                c["claim"] = 1.0
        elif margin is not None and c["se"] == 0:  # no variance: inside the margin for certain, or outside
            inside = abs(c["effect"]) < margin
            c["tost"], c["claim"] = (0.0, 0.0) if inside else (1.0, 0.0 if abs(c["effect"]) > margin else 1.0)
        elif margin is not None:
            se, df, m = c["se"], c["df"], c["effect"]
            c["tost"] = max(stats.t.sf((m + margin) / se, df), stats.t.sf((margin - m) / se, df))
            c["claim"] = c["tost"] if abs(m) < margin else stats.t.sf((abs(m) - margin) / se, df)
        else:
            c["claim"] = c["p"]
        return c

    axes = plan["axes"]
    out = []
    for text in plan["expect"]:
        trend = re.match(r"^(\S+) (increases|decreases) with (\S+)(?: up to (\S+))?(?: then flat \(±([0-9.]+)\))?$",
                         text)
        if trend:
            metric, _, axis, knee, margin = trend.groups()
            values = sorted(dict.fromkeys(label(r["axes"][axis]) for r in plan["runs"]), key=float)
            knee = knee or values[-1]  # without "up to": the last value against the first
            made = [moments(axis, knee, values[0], metric, None)]
            if margin:
                made += [moments(axis, v, knee, metric, float(margin)) for v in values[values.index(knee) + 1:]]
            p = max(m["p"] if i == 0 else m["tost"] for i, m in enumerate(made))
            out.append({"p": p, "steps": [m["effect"] for m in made]})
            continue
        m = re.match(r"^(\S+) (>=|<=|[<>~]) (\S+) on (\S+)(?: \(±([0-9.]+)\))?$", text)
        assert m, text
        a, op, b, metric, margin = m.groups()
        side = {">=": 1, "<=": -1}.get(op, 0)
        if "," in a:  # cells written axis=value,axis=value (the shipped studies name every axis)
            axis = ",".join(x for x in axes if f"{x}=" in a)
        else:
            axis = next(x for x in axes if {a, b} <= {label(r["axes"].get(x)) for r in plan["runs"]})
        c = moments(axis, a, b, metric, float(margin) if margin else None, side)
        out.append({"effect": c["effect"], "p": c["claim"]})
    order = sorted(range(len(out)), key=lambda i: out[i]["p"])
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(out) - rank) * out[i]["p"]))
        out[i]["p_holm"] = running
    return out


def test_committed_studies_of_the_shipped_world_recomputed_from_their_answers():
    """Every study committed under docs/examples with its runs' answers: effects, p and Holm p of its Findings
    from a second, plain implementation agree with findings.json to 3 decimals."""
    studies = committed_studies_with_answers()
    assert studies, "no committed study with predictions under docs/examples"
    for study in studies:
        committed = json.loads((study / "findings.json").read_text())["findings"]
        plain = plain_study_findings(study)
        assert len(plain) == len(committed), study
        for f, g in zip(committed, plain):
            assert f["method"] == "question", (study.name, f["text"])
            if "steps" in g:
                assert [round(s["effect"], 3) for s in f["steps"]] == [round(x, 3) for x in g["steps"]], f["text"]
            else:
                assert round(f["effect"], 3) == round(g["effect"], 3), (study.name, f["text"])
            assert round(f["p"], 3) == round(g["p"], 3), (study.name, f["text"], f["p"], g["p"])
            assert round(f["p_holm"], 3) == round(g["p_holm"], 3), (study.name, f["text"])


def test_one_differing_answer_has_no_question_component_wherever_it_is():
    """A table with a single non-zero cell has MS_cols = MS_e exactly; float rounding must not decide whether a
    question component (and its Satterthwaite degrees of freedom) enters: every position gives the seed-paired test."""
    from vlkit.ablate.stats import crossed_stat

    for k, q, offset in [(2, 50, 0.0), (3, 125, 0.0), (3, 125, -1.0), (4, 50, 1.0)]:
        results = set()
        for i in range(k):
            for j in (0, 7, q // 2, q - 1):
                d = np.full((k, q), offset)  # offset: every answer differs the same way but one
                d[i, j] += 1.0
                c = crossed_stat(d)
                rows = d.mean(axis=1)
                assert c.df == k - 1 and c.var_question == 0.0, (k, q, offset, i, j)
                assert c.se == pytest.approx(math.sqrt(np.var(rows, ddof=1) / k), rel=1e-9)
                results.add((round(c.se, 12), round(c.p(), 12)))
        assert len(results) == 1, (k, q, offset)
