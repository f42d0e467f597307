"""Declared expectations (``expect:``): grammar, checks at load, verdicts on synthetic per-seed results, and a
report whose Findings match its own results.csv. No model is trained here."""
from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from vlkit.ablate.expect import Comparison, ExpectationError, Trend, check_expectations, parse_expectation, resolve
from vlkit.ablate.findings import findings_for, judge
from vlkit.ablate.stats import crossed_stat, holm, pairs_needed
from helpers import vlkit
from vlkit.config import RECIPES_DIR, ConfigError, load_recipe

AXES = {"tokens": ["cls", "patch"], "num_image_tokens": [1, 4, 9, 16]}


# ---- grammar ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("patch > cls on acc/position_of_object", Comparison("e", "", "acc/position_of_object", ">", "patch", "cls")),
    ("cls<patch on accuracy", Comparison("e", "", "accuracy", "<", "cls", "patch")),
    ("cls ~ patch on acc/existence (±0.05)", Comparison("e", "", "acc/existence", "~", "cls", "patch", 0.05)),
    ("cls ~ patch on acc/existence (+-0.05)", Comparison("e", "", "acc/existence", "~", "cls", "patch", 0.05)),
    ("cls  ~  patch on acc/existence(± 0.1)", Comparison("e", "", "acc/existence", "~", "cls", "patch", 0.1)),
    ("tokens=patch > tokens=cls on accuracy", Comparison("e", "", "accuracy", ">", "tokens=patch", "tokens=cls")),
    ("patch >= cls on accuracy (±0.05)", Comparison("e", "", "accuracy", ">=", "patch", "cls", 0.05)),
    ("patch≥cls on accuracy (+-0.05)", Comparison("e", "", "accuracy", ">=", "patch", "cls", 0.05)),
    ("cls <= patch on acc/count (±0.1)", Comparison("e", "", "acc/count", "<=", "cls", "patch", 0.1)),
    ("cls ≤ patch on acc/count (±0.1)", Comparison("e", "", "acc/count", "<=", "cls", "patch", 0.1)),
    ("accuracy increases with num_image_tokens", Trend("e", "", "accuracy", "increases", "num_image_tokens")),
    ("val_loss decreases with num_image_tokens up to 9",
     Trend("e", "", "val_loss", "decreases", "num_image_tokens", "9")),
    ("acc/relation increases with num_image_tokens up to 9 then flat (+-0.05)",
     Trend("e", "", "acc/relation", "increases", "num_image_tokens", "9", 0.05)),
])
def test_grammar_reads_good_expectations(text, expected):
    got = parse_expectation(text, "e")
    assert got == type(expected)(**{**expected.__dict__, "text": got.text})


@pytest.mark.parametrize("text,match", [
    ("patch beats cls", "cannot read 'patch beats cls'; write '<a> > <b> on <metric>'"),
    ("patch > cls", "names no metric"),
    ("patch > cls at accuracy", "expected 'on <metric>'"),
    ("cls ~ patch on accuracy", r"equivalence needs its margin, e.g. 'cls ~ patch on accuracy \(±0.05\)'"),
    ("cls ~ patch on accuracy (±0)", "must be a positive number"),
    ("cls ~ patch on accuracy (±-0.1)", "must be a positive number"),
    ("cls ~ patch on accuracy (0.05)", r"not of the form \(±0.05\) or \(\+-0.05\)"),
    ("cls ~ patch on accuracy (±abc)", "not of the form"),
    ("cls ~ patch on accuracy (±1.2.3)", "is not a number"),
    ("patch > cls on accuracy (±0.05)", "a margin only applies to '~' .equivalence. and '>=' / '<='"),
    ("patch >= cls (±0.1)", r"names no metric; write 'patch >= cls on <metric> \(±0.1\)'"),
    ("patch >= cls", r"names no metric; write 'patch >= cls on <metric> \(±0.05\)'"),
    ("patch >= cls on accuracy", r"non-inferiority needs its margin, e.g. 'patch >= cls on accuracy \(±0.05\)'"),
    ("patch >= cls on accuracy (±0)", "must be a positive number"),
    ("patch => cls on accuracy (±0.05)", "'=>' is not an operator; did you mean '>='"),
    ("patch=<cls on accuracy (±0.05)", "'=<' is not an operator; did you mean '<='"),
    ("patch > = cls on accuracy (±0.05)", "write '>=' without a space"),
    ("accuracy increase with num_image_tokens", "Did you mean 'increases'"),
    ("accuracy increases with num_image_tokens then flat (±0.05)", "'then flat' needs a knee"),
    ("accuracy increases with num_image_tokens up to 9 then flat", "'then flat' needs its margin"),
    ("accuracy increases with num_image_tokens up to 9 then level (±0.05)", "write 'flat"),
])
def test_grammar_rejects_bad_expectations_clearly(text, match):
    with pytest.raises(ExpectationError, match=match):
        parse_expectation(text, "expect[0]")


def test_non_string_expectation_is_an_error():
    with pytest.raises(ExpectationError, match="is a string, got int"):
        parse_expectation(3, "expect[0]")


@pytest.mark.parametrize("text,match", [
    ("patch > clss on accuracy", "'clss' is not a value of grid axis 'tokens'.*Did you mean 'cls'"),
    ("pach > cls on accuracy", "'pach' is not a value of any grid axis. Did you mean 'patch'"),
    ("patch > cls on acc/positon_of_object", "Did you mean 'position_of_object'"),
    ("patch > cls on acuracy", "unknown metric 'acuracy'. Did you mean 'accuracy'"),
    ("patch > cls on acc/", "names no question type"),
    ("patch > 4 on accuracy", "values of different axes"),
    ("patch > patch on accuracy", "with itself"),
    ("tokenz=patch > cls on accuracy", "'tokenz' is not a grid axis. Did you mean 'tokens'"),
    ("accuracy increases with num_image_token", "Did you mean 'num_image_tokens'"),
    ("accuracy increases with tokens", "needs an axis with numeric values.*Did you mean 'num_image_tokens'"),
    ("accuracy increases with num_image_tokens up to 10", r"'10' is not a value of grid axis 'num_image_tokens'"),
    ("accuracy increases with num_image_tokens up to 1", "smallest value"),
    ("accuracy increases with num_image_tokens up to 16 then flat (±0.05)", "no value of 'num_image_tokens' lies after"),
])
def test_resolve_against_grid_and_metrics_suggests_nearest(text, match):
    qtypes = ["position_of_object", "existence", "count"]
    with pytest.raises(ExpectationError, match=match):
        resolve(parse_expectation(text, "expect[0]"), AXES, qtypes)


def test_ambiguous_bare_value_asks_for_axis_and_accepts_it():
    axes = {"projector": ["mlp", "linear"], "fusion.projector": ["mlp", "linear"]}
    with pytest.raises(ExpectationError, match="more than one axis.*projector=mlp"):
        resolve(parse_expectation("mlp > linear on accuracy", "e"), axes)
    got = resolve(parse_expectation("projector=mlp > linear on accuracy", "e"), axes)
    assert (got.axis, got.a, got.b) == ("projector", "mlp", "linear")
    # numeric axis values match however YAML writes them
    got = resolve(parse_expectation("1e-3 > 3.0e-4 on accuracy", "e"), {"stages.instruct.lr": [0.001, 0.0003]})
    assert (got.axis, got.a, got.b) == ("stages.instruct.lr", "0.001", "0.0003")


def test_check_expectations_names_key_path_of_each_problem():
    exps, errors = check_expectations(["patch > cls on accuracy", "patch > clss on accuracy", "nonsense"],
                                      AXES, "study.yaml")
    assert len(exps) == 1 and len(errors) == 2
    assert errors[0].startswith("study.yaml: expect[1]: 'clss'") and "Did you mean 'cls'?" in errors[0]
    assert errors[1].startswith("study.yaml: expect[2]: cannot read")
    _, errors = check_expectations("patch > cls on accuracy", AXES, "study.yaml")
    assert errors and "a list of expectation strings" in errors[0]


def _recipe(tmp_path: Path, expect: list[str], grid: str = "grid: {tokens: [cls, patch], seeds: 2}") -> Path:
    p = tmp_path / "study.yaml"
    lines = "\n".join(f"  - {json.dumps(e)}" for e in expect)
    p.write_text(f"base: {RECIPES_DIR / 'mlp_patch.yaml'}\nname: study\n{grid}\nexpect:\n{lines}\n")
    return p


def test_recipe_load_rejects_typos_naming_file_key_and_nearest_name(tmp_path):
    path = _recipe(tmp_path, ["patch > cls on acc/position_of_object", "patch > clss on acc/position_of_object",
                              "cls ~ patch on acc/existance (±0.05)", "cls ~ patch on accuracy (±0.05"])
    with pytest.raises(ConfigError) as exc:
        load_recipe(path)
    errors = exc.value.errors
    assert len(errors) == 3, errors
    assert errors[0].startswith(f"{path}: expect[1]: ") and "Did you mean 'cls'?" in errors[0]
    assert errors[1].startswith(f"{path}: expect[2]: ") and "Did you mean 'existence'?" in errors[1]
    assert errors[2].startswith(f"{path}: expect[3]: cannot read")


def test_run_recipe_without_grid_still_checks_grammar_and_metrics(tmp_path):
    # a grid's runs load the recipe with grid=null: axis values cannot be checked there, the rest is
    path = _recipe(tmp_path, ["patch > cls on acc/position_of_object"])
    assert load_recipe(path, ["grid=null"]).expect == ["patch > cls on acc/position_of_object"]
    path = _recipe(tmp_path, ["patch > cls on acc/positon_of_object"])
    with pytest.raises(ConfigError, match=r"expect\[0\].*Did you mean 'position_of_object'"):
        load_recipe(path, ["grid=null"])


def test_shipped_study_declares_the_issue_orderings_and_keeps_run_identity():
    path = RECIPES_DIR / "ablations" / "cls_vs_patch.yaml"
    r = load_recipe(path)
    exps, errors = check_expectations(r.expect, {"tokens": ["cls", "pooled"]}, str(path))
    assert not errors
    better = {e.metric.removeprefix("acc/") for e in exps if e.op == ">"}
    same = {e.metric.removeprefix("acc/") for e in exps if e.op == "~"}
    assert better == {"position_of_object", "colour_at_position", "shape_at_position", "relation"}
    assert same == {"count", "existence", "shape_of_colour"} and all(e.margin for e in exps if e.op == "~")
    # expectations are not part of what a run computes: finished runs of the study keep their identity
    assert r.identity() == load_recipe(path, ["expect=null"]).identity()
    assert "expect" not in load_recipe(path, ["expect=null"]).to_dict()


def test_plan_checks_expectations_against_command_line_axes_before_anything_runs(tmp_path):
    from vlkit.ablate.plan import make_plan

    with pytest.raises(ConfigError, match=r"expect\[0\]: 'cls' is not a value of grid axis 'tokens'.*Did you mean 'cls_patch'"):
        make_plan(str(RECIPES_DIR / "ablations" / "cls_vs_patch.yaml"), [], {"tokens": "pooled,cls_patch"}, "2",
                  tmp_path / "out", "test")
    assert not (tmp_path / "out").exists()


# ---- verdicts on synthetic per-seed results ---------------------------------------------------------------------
def rows_from(values: dict[tuple, list[float]], axes: tuple[str, ...], metric: str = "accuracy") -> list[dict]:
    """Result rows like report.collect's: one per (axis values, seed)."""
    out = []
    for key, per_seed in values.items():
        for seed, v in enumerate(per_seed):
            out.append({**dict(zip(axes, key)), "seed": seed, "status": "finished", metric: v})
    return out


def one(text: str, rows: list[dict], axes: dict) -> object:
    exp = resolve(parse_expectation(text, "expect[0]"), axes)
    return judge([exp], rows, list(axes))[0]


TOK = {"tokens": ["cls", "patch"]}


def test_comparison_supported_contradicted_inconclusive():
    cls = [0.30, 0.32, 0.28, 0.31, 0.29]
    rows = rows_from({("cls",): cls, ("patch",): [c + d for c, d in zip(cls, [0.20, 0.22, 0.18, 0.21, 0.19])]},
                     ("tokens",))
    f = one("patch > cls on accuracy", rows, TOK)
    assert f.verdict == "supported" and f.effect == pytest.approx(0.2) and f.n_pairs == 5
    assert f.ci_low > 0 and f.p < 0.05 and f.power_note is None
    assert f.sentence.startswith("Supported: patch − cls = +0.200 on accuracy")
    assert one("cls > patch on accuracy", rows, TOK).verdict == "contradicted"
    assert one("cls < patch on accuracy", rows, TOK).verdict == "supported"
    noisy = rows_from({("cls",): cls, ("patch",): [c + d for c, d in zip(cls, [0.1, -0.08, 0.05, -0.02, 0.0])]},
                      ("tokens",))
    f = one("patch > cls on accuracy", noisy, TOK)
    assert f.verdict == "inconclusive" and f.power_note.startswith("Power: about ")
    assert "seeds per arm" in f.power_note and f.sentence.startswith("Inconclusive:")


def test_equivalence_judged_by_ci_inside_or_outside_margin_not_by_p():
    base = [0.50, 0.55, 0.45, 0.52, 0.48, 0.51]

    def rows(diffs):
        return rows_from({("cls",): base, ("patch",): [b - d for b, d in zip(base, diffs)]}, ("tokens",))

    inside = one("cls ~ patch on accuracy (±0.05)", rows([0.01, -0.01, 0.0, 0.005, -0.005, 0.0]), TOK)
    assert inside.verdict == "supported" and -0.05 <= inside.ci_low and inside.ci_high <= 0.05
    outside = one("cls ~ patch on accuracy (±0.05)", rows([0.20, 0.22, 0.18, 0.21, 0.19, 0.2]), TOK)
    assert outside.verdict == "contradicted" and outside.ci_low > 0.05
    # p > 0.05 (no significant difference) is not equivalence: the CI still crosses the margin
    wide = one("cls ~ patch on accuracy (±0.05)", rows([0.15, -0.12, 0.08, -0.1, 0.05, -0.02]), TOK)
    assert stats.ttest_1samp([0.15, -0.12, 0.08, -0.1, 0.05, -0.02], 0).pvalue > 0.05
    assert wide.verdict == "inconclusive" and "inside ±0.05" in wide.power_note
    # both arms identical in every seed (the blind answer): at run level the differences have no spread, so the
    # noise is not estimated -- no interval, no p, inconclusive (never certainty); the same for a direction, and
    # for pairs that all differ by one same non-zero amount
    same = one("cls ~ patch on accuracy (±0.05)", rows([0.0] * 6), TOK)
    assert same.verdict == "inconclusive" and math.isnan(same.ci_low) and math.isnan(same.p_holm)
    assert "no spread" in same.sentence and "question-level" in same.sentence and "SD 0" in same.power_note
    for diffs in ([0.0] * 6, [0.1] * 6):
        f = one("patch > cls on accuracy", rows(diffs), TOK)
        assert f.verdict == "inconclusive" and "exactly this amount" in f.sentence and "SD 0" in f.power_note
        assert "no CI (the paired differences have no spread)" in f.sentence


def test_non_inferiority_judged_by_the_one_sided_test_against_the_margin():
    base = [0.50, 0.55, 0.45, 0.52, 0.48, 0.51]

    def rows(diffs):  # patch − cls = diffs
        return rows_from({("cls",): base, ("patch",): [b + d for b, d in zip(base, diffs)]}, ("tokens",))

    # a little behind, but surely by less than 0.05: non-inferior (a "~" within ±0.05 would say the same here,
    # a ">" would not)
    behind = rows([-0.01, -0.02, 0.0, -0.015, -0.005, -0.01])
    f = one("patch >= cls on accuracy (±0.05)", behind, TOK)
    assert f.kind == "non-inferiority" and f.verdict == "supported" and f.ci_level == pytest.approx(0.9)
    assert f.effect == pytest.approx(-0.01) and -0.05 < f.ci_low < f.effect < f.ci_high
    d = [-0.01, -0.02, 0.0, -0.015, -0.005, -0.01]
    se = stats.tstd(d) / math.sqrt(6)
    assert f.p == pytest.approx(stats.t.sf((np.mean(d) + 0.05) / se, 5))  # one-sided t of a − b > −m
    assert "not lower than cls by more than 0.05" in f.sentence and f.power_note is None
    assert one("patch > cls on accuracy", behind, TOK).verdict == "contradicted"
    # far ahead: non-inferior too (the claim is one-sided)
    assert one("patch >= cls on accuracy (±0.05)", rows([0.2, 0.22, 0.18, 0.21, 0.19, 0.2]), TOK).verdict \
        == "supported"
    # surely worse by more than the margin: contradicted, with the p of falling short
    worse = rows([-0.2, -0.22, -0.18, -0.21, -0.19, -0.2])
    f = one("patch >= cls on accuracy (±0.05)", worse, TOK)
    assert f.verdict == "contradicted" and f.ci_high < -0.05 and "lower than cls by more than 0.05" in f.sentence
    # "<=" mirrors it: cls <= patch within 0.05 means cls − patch < +0.05
    assert one("cls <= patch on accuracy (±0.05)", behind, TOK).verdict == "supported"
    assert one("cls <= patch on accuracy (±0.05)", worse, TOK).verdict == "contradicted"
    assert "cls is higher than patch by more than 0.05" in one("cls <= patch on accuracy (±0.05)", worse, TOK).sentence
    # noisy around 0: cannot rule out falling short by 0.05; the power note sizes a one-sided test at δ = m
    f = one("patch >= cls on accuracy (±0.05)", rows([0.15, -0.12, 0.08, -0.1, 0.05, -0.02]), TOK)
    assert f.verdict == "inconclusive" and "cannot rule out patch being lower" in f.sentence
    assert "within 0.05" in f.power_note and "if the true difference were 0" in f.power_note
    # noisy and a little past the margin: the note sizes the test of falling short, at the distance past −m (0.02)
    short = [-0.2, 0.05, -0.15, 0.0, -0.1, -0.02]
    f = one("patch >= cls on accuracy (±0.05)", rows(short), TOK)
    assert f.verdict == "inconclusive" and f.effect == pytest.approx(-0.07)
    assert "show patch is lower than cls by more than 0.05" in f.power_note
    mirrored = one("cls <= patch on accuracy (±0.05)", rows(short), TOK)
    assert "show cls is higher than patch by more than 0.05" in mirrored.power_note
    # one-sided at α = 0.05 is two-sided at 0.1
    assert int(f.power_note.split("about ")[1].split()[0]) == pairs_needed(stats.tstd(short), 0.02, 0.1)


def test_non_inferiority_at_question_level_is_the_one_sided_crossed_test():
    rng = random.Random(11)
    rows, answers = [], {}
    for tok, p in (("cls", 0.62), ("patch", 0.60)):
        for seed in range(3):
            run = f"{tok}-{seed}"
            answers[run] = {f"q{i}": ("count", rng.random() < p) for i in range(400)}
            rows.append({"tokens": tok, "seed": seed, "status": "finished", "run": run,
                         "accuracy": sum(c for _, c in answers[run].values()) / 400})
    f = judge([resolve(parse_expectation("patch >= cls on accuracy (±0.1)", "expect[0]"), TOK)], rows, ["tokens"],
              answers)[0]
    want = crossed_stat(np.array([[float(answers[f"patch-{s}"][f"q{i}"][1]) - float(answers[f"cls-{s}"][f"q{i}"][1])
                                   for i in range(400)] for s in range(3)]))
    assert f.method == "question" and f.effect == pytest.approx(want.effect)
    assert want.effect > -0.1 and f.p == pytest.approx(stats.t.sf((want.effect + 0.1) / want.se, want.df))
    lo, hi = want.ci(0.9)
    assert (f.ci_low, f.ci_high) == pytest.approx((lo, hi)) and (f.verdict == "supported") == (f.p < 0.05)
    # "<=" at question level: cls − patch < +0.1, one-sided on the mirrored table
    g = judge([resolve(parse_expectation("cls <= patch on accuracy (±0.1)", "expect[0]"), TOK)], rows, ["tokens"],
              answers)[0]
    assert g.effect == pytest.approx(-want.effect) and g.p == pytest.approx(f.p)
    assert g.p == pytest.approx(stats.t.sf((0.1 - g.effect) / want.se, want.df))


def test_non_inferiority_exact_bounds_when_no_answer_differs_or_all_differ_one_way():
    zeros = crossed_stat(np.zeros((3, 125)))
    assert zeros.p_beyond(-0.05, 1) == pytest.approx(0.95 ** 125)  # P(no question of 125 differs | δ <= −0.05)
    assert zeros.p_beyond(-0.05, -1) == 1.0  # the estimate 0 is above −0.05: nothing says it is below
    ahead = crossed_stat(np.ones((2, 20)))
    assert ahead.p_beyond(-0.05, 1) == pytest.approx(0.475 ** 20) and ahead.p_beyond(-0.05, -1) == 1.0
    assert ahead.p_beyond(-1.5, 1) == 0.0  # a bound no accuracy difference reaches: certain, never negative
    behind = crossed_stat(-np.ones((2, 20)))
    assert behind.p_beyond(-0.05, -1) == pytest.approx(0.525 ** 20) and behind.p_beyond(-0.05, 1) == 1.0


def test_holm_across_expectations():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, float("nan"), 0.01])[2] == pytest.approx(0.03) and math.isnan(holm([float("nan")])[0])
    # p ≈ 0.049 alone: supported; with a second expectation in the study Holm doubles it: inconclusive
    cls = [0.3, 0.3, 0.3]
    values = {("cls",): cls, ("patch",): [0.45, 0.55, 0.65]}
    rows = rows_from(values, ("tokens",)) + rows_from(values, ("tokens",), "acc/count")
    rows = [{**a, **b} for a, b in zip(rows[:6], rows[6:])]
    p = stats.ttest_rel([0.45, 0.55, 0.65], cls).pvalue
    assert 0.025 < p < 0.05
    alone = judge([resolve(parse_expectation("patch > cls on accuracy", "expect[0]"), TOK)], rows, ["tokens"])
    assert alone[0].verdict == "supported" and alone[0].p_holm == pytest.approx(p)
    both = judge([resolve(parse_expectation(t, f"expect[{i}]"), TOK) for i, t in
                  enumerate(["patch > cls on accuracy", "patch > cls on acc/count"])], rows, ["tokens"])
    assert [f.p_holm for f in both] == pytest.approx([2 * p, 2 * p])
    assert [f.verdict for f in both] == ["inconclusive", "inconclusive"]
    assert "α = 0.05/2" in both[0].power_note


def test_pairs_by_seed_within_each_setting_of_the_other_axes():
    values = {("cls", "mlp"): [0.1, 0.2, 0.3], ("patch", "mlp"): [0.2, 0.3, 0.4],
              ("cls", "linear"): [0.5, 0.6, 0.7], ("patch", "linear"): [0.8, 0.9, 1.0]}
    rows = rows_from(values, ("tokens", "projector"))
    rows[0]["status"] = "failed"  # cls/mlp seed 0: it and its partner drop out
    axes = {"tokens": ["cls", "patch"], "projector": ["mlp", "linear"]}
    f = one("patch > cls on accuracy", rows, axes)
    assert f.n_pairs == 5
    assert f.effect == pytest.approx((0.1 + 0.1 + 0.3 * 3) / 5)


# ---- cells of a factorial grid ----------------------------------------------------------------------------------
FACTORIAL = {"projector": ["linear", "mlp"], "num_image_tokens": [4, 16]}


def test_cell_comparison_resolves_in_grid_order_whatever_the_text_order():
    want = ("projector,num_image_tokens", "projector=linear,num_image_tokens=16", "projector=mlp,num_image_tokens=4")
    for text in ["projector=linear,num_image_tokens=16 > projector=mlp,num_image_tokens=4 on accuracy",
                 "num_image_tokens=16,projector=linear > projector=mlp,num_image_tokens=4 on accuracy",
                 "linear,16 > mlp,4 on accuracy"]:  # bare values that belong to one axis each
        got = resolve(parse_expectation(text, "e"), FACTORIAL)
        assert (got.axis, got.a, got.b) == want, text


@pytest.mark.parametrize("text,match", [
    ("projector=linear,num_image_tokens=16 > projector=mlp on accuracy", "set different axes"),
    ("linear,16 > linear,16 on accuracy", "compares a cell with itself"),
    ("linear,mlp > linear,4 on accuracy", "sets axis 'projector' twice"),
    ("linear,,16 > mlp,4 on accuracy", "an empty part"),
    ("linear,32 > mlp,4 on accuracy", "'32' is not a value of any grid axis"),
    ("projector=linear,num_image_token=16 > mlp,4 on accuracy", "'num_image_token' is not a grid axis. Did you mean"),
])
def test_cell_comparison_errors_name_the_part_at_fault(text, match):
    with pytest.raises(ExpectationError, match=match):
        resolve(parse_expectation(text, "expect[0]"), FACTORIAL)


def test_cell_comparison_pairs_by_seed_within_the_axes_it_does_not_name():
    # (projector, tokens, lr): the cells fix projector and tokens; each lr setting gives its own seed pairs
    values = {("linear", 16, "a"): [0.60, 0.62, 0.64], ("mlp", 4, "a"): [0.40, 0.45, 0.41],
              ("linear", 16, "b"): [0.70, 0.71, 0.69], ("mlp", 4, "b"): [0.50, 0.52, 0.47],
              ("mlp", 16, "a"): [0.9, 0.9, 0.9], ("linear", 4, "a"): [0.1, 0.1, 0.1],
              ("mlp", 16, "b"): [0.9, 0.9, 0.9], ("linear", 4, "b"): [0.1, 0.1, 0.1]}
    rows = rows_from(values, ("projector", "num_image_tokens", "lr"))
    rows[0]["status"] = "failed"  # linear/16/a seed 0: it and its partner mlp/4/a seed 0 drop out
    axes = {**FACTORIAL, "lr": ["a", "b"]}
    f = one("projector=linear,num_image_tokens=16 > projector=mlp,num_image_tokens=4 on accuracy", rows, axes)
    diffs = [0.62 - 0.45, 0.64 - 0.41, 0.70 - 0.50, 0.71 - 0.52, 0.69 - 0.47]
    assert f.n_pairs == 5 and f.effect == pytest.approx(sum(diffs) / 5)
    assert f.p == pytest.approx(stats.ttest_1samp(diffs, 0).pvalue)
    assert f.verdict == "supported" and f.axis == "projector,num_image_tokens"
    assert f.sentence.startswith("Supported: projector=linear,num_image_tokens=16 − projector=mlp,num_image_tokens=4")
    # the single-axis comparisons of the same grid still pair within every other axis
    assert one("mlp > linear on accuracy", rows, axes).n_pairs == 11


def test_cell_comparison_at_question_level_uses_the_two_cells_answers():
    rng = random.Random(3)
    cells = {("linear", 16): 0.7, ("mlp", 4): 0.5, ("mlp", 16): 0.8, ("linear", 4): 0.4}
    rows, answers = [], {}
    for (proj, n), p in cells.items():
        for seed in range(3):
            run = f"{proj}-{n}-{seed}"
            ans = {f"q{i}": ("count", rng.random() < p) for i in range(40)}
            answers[run] = ans
            rows.append({"projector": proj, "num_image_tokens": n, "seed": seed, "status": "finished", "run": run,
                         "accuracy": sum(c for _, c in ans.values()) / 40})
    exp = resolve(parse_expectation("linear,16 > mlp,4 on accuracy", "expect[0]"), FACTORIAL)
    f = judge([exp], rows, list(FACTORIAL), answers)[0]
    table = [[float(answers[f"linear-16-{s}"][f"q{i}"][1]) - float(answers[f"mlp-4-{s}"][f"q{i}"][1])
              for i in range(40)] for s in range(3)]
    want = crossed_stat(np.array(table))
    assert f.method == "question" and f.effect == pytest.approx(want.effect) and f.p == pytest.approx(want.p())


def test_too_few_pairs_is_inconclusive_with_a_note():
    rows = rows_from({("cls",): [0.3], ("patch",): [0.9]}, ("tokens",))
    f = one("patch > cls on accuracy", rows, TOK)
    assert f.verdict == "inconclusive" and f.n_pairs == 1 and "at least 2 seeds" in f.power_note


def test_trend_as_planned_contrasts_knee_vs_start_then_flat_vs_knee():
    axes = {"num_image_tokens": [16, 1, 9, 4]}  # declared in any order, tested in numeric order
    noise = {1: [0.0, 0.01, -0.01, 0.005, -0.005], 4: [0.005, -0.005, 0.0, 0.01, -0.01],
             9: [0.01, -0.01, 0.0, -0.005, 0.005], 16: [-0.005, 0.005, 0.01, 0.0, -0.01]}  # each seed its own
    curve = {1: 0.2, 4: 0.4, 9: 0.6, 16: 0.6}

    def rows():
        return rows_from({(n,): [v + e for e in noise[n]] for n, v in curve.items()}, ("num_image_tokens",))

    f = one("accuracy increases with num_image_tokens up to 9 then flat (±0.05)", rows(), axes)
    assert f.verdict == "supported", f.sentence
    assert [(s["from"], s["to"], s["kind"]) for s in f.steps] == [("1", "9", "increases"), ("9", "16", "flat")]
    assert f.sentence.startswith("Supported: accuracy rises with num_image_tokens up to 9 and stays within ±0.05")
    # without 'up to' the contrast is the last value against the first: 16 vs 1
    f = one("accuracy increases with num_image_tokens", rows(), axes)
    assert f.verdict == "supported" and [(s["from"], s["to"]) for s in f.steps] == [("1", "16")]
    # a later value beyond the margin of the knee contradicts 'then flat'; the steps in between are not tested
    curve[16] = 0.3
    assert one("accuracy increases with num_image_tokens up to 9 then flat (±0.05)", rows(), axes).verdict == \
        "contradicted"
    assert one("accuracy increases with num_image_tokens", rows(), axes).verdict == "supported"  # 16 still > 1
    assert one("accuracy decreases with num_image_tokens up to 4", rows(), axes).verdict == "contradicted"
    curve.update({1: 0.7, 9: 0.3})
    f = one("accuracy increases with num_image_tokens up to 9", rows(), axes)
    assert f.verdict == "contradicted" and "1→9" in f.sentence


def test_power_calculation_matches_textbook_values():
    # paired t, effect size 0.5 (delta/sd), alpha 0.05 two-sided, 80% power: 34 pairs (G*Power: 34)
    assert pairs_needed(1.0, 0.5) == 34
    assert pairs_needed(1.0, 1.0) == 10  # G*Power: 10
    assert pairs_needed(0.0, 0.5) is None and pairs_needed(1.0, 0.0) is None


# ---- a report's Findings match its own results.csv ---------------------------------------------------------------
def make_ablation(out: Path, expect: list[str] | None, acc: dict[str, list[dict[str, float]]]) -> None:
    """An ablation directory as `vlkit ablate` leaves it: plan.json and finished run directories."""
    runs = []
    for tokens, per_seed in acc.items():
        for seed, by_type in enumerate(per_seed):
            rid = f"tokens-{tokens}_seed-{seed}"
            runs.append({"id": rid, "seed": seed, "axes": {"tokens": tokens}, "overrides": [], "mapping": None,
                         "skipped": None})
            rd = out / "runs" / rid
            rd.mkdir(parents=True)
            overall = sum(by_type.values()) / len(by_type)
            (rd / "summary.json").write_text(json.dumps({
                "status": "finished", "num_image_tokens": 1 if tokens == "cls" else 64, "wall_time_s": 1.0,
                "stages": {"instruct": {"accuracy": overall, "val_loss": 0.5, "accuracy_by_type": by_type,
                                        "trainable_params": 10, "tokens_per_s": 100.0}}}))
    plan = {"recipe": "synthetic", "recipe_path": "synthetic.yaml", "axes": ["tokens"], "seeds": [0, 1, 2, 3],
            "base_overrides": [], "num_patches": 64, "command": "vlkit ablate synthetic.yaml", "runs": runs}
    if expect is not None:
        plan["expect"] = expect
    (out / "plan.json").write_text(json.dumps(plan))


SYNTH = {
    "cls": [{"position_of_object": 0.10, "existence": 0.60, "count": 0.8},
            {"position_of_object": 0.16, "existence": 0.58, "count": 0.8},
            {"position_of_object": 0.12, "existence": 0.62, "count": 0.8},
            {"position_of_object": 0.14, "existence": 0.56, "count": 0.8}],
    "patch": [{"position_of_object": 0.36, "existence": 0.61, "count": 0.8},
              {"position_of_object": 0.40, "existence": 0.58, "count": 0.8},
              {"position_of_object": 0.30, "existence": 0.60, "count": 0.8},
              {"position_of_object": 0.42, "existence": 0.57, "count": 0.8}],
}


def test_report_findings_first_and_recomputable_from_results_csv(tmp_path):
    from vlkit.ablate.report import write_report

    expect = ["patch > cls on acc/position_of_object", "cls ~ patch on acc/existence (±0.05)",
              "cls ~ patch on acc/count (+-0.02)", "patch > cls on acc/relation"]
    make_ablation(tmp_path, expect, SYNTH)
    result = write_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert report.index("## Findings") < report.index("Runs: 8") < report.index("## Paired comparisons")
    data = json.loads((tmp_path / "findings.json").read_text())
    assert data["holm_family"] == 3 and len(data["findings"]) == 4 == len(result["findings"])
    by_key = {f["key"]: f for f in data["findings"]}
    # the metric no run measured is listed, not tested, with the nearest measured name; outside the Holm family
    assert by_key["expect[3]"]["verdict"] == "not tested" and "acc/relation" in by_key["expect[3]"]["sentence"]
    assert "Measured:" in by_key["expect[3]"]["sentence"] and "Did you mean" not in by_key["expect[3]"]["sentence"]
    with pytest.raises(ExpectationError, match="Did you mean 'acc/existence'"):
        resolve(parse_expectation("cls ~ patch on acc/existance (±0.05)", "e"), TOK, columns=["acc/existence"])
    # identical arms (0.8 in every seed): at run level no spread, so no interval and no p -- inconclusive, and its
    # p counts as 1 in Holm
    assert by_key["expect[2]"]["verdict"] == "inconclusive" and by_key["expect[2]"]["p"] is None

    # recompute expect[0] and expect[1] from results.csv alone
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    col = {t: {int(r["seed"]): float(r["acc/position_of_object"]) for r in rows if r["tokens"] == t}
           for t in ("cls", "patch")}
    patch, cls = [col["patch"][s] for s in range(4)], [col["cls"][s] for s in range(4)]
    test = stats.ttest_rel(patch, cls)
    diffs = [a - b for a, b in zip(patch, cls)]
    mean = sum(diffs) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3)
    half = stats.t.ppf(0.975, 3) * sd / 2
    exi = {t: {int(r["seed"]): float(r["acc/existence"]) for r in rows if r["tokens"] == t} for t in ("cls", "patch")}
    ed = [exi["cls"][s] - exi["patch"][s] for s in range(4)]
    em = sum(ed) / 4
    ese = math.sqrt(sum((d - em) ** 2 for d in ed) / 3) / 2
    tost = max(stats.t.sf((em + 0.05) / ese, 3), stats.t.sf((0.05 - em) / ese, 3))
    # Holm over the three tested p-values (expect[2]'s is undefined: it counts as 1)
    ps = sorted([test.pvalue, tost, 1.0])
    adjusted = {}
    running = 0.0
    for rank, p in enumerate(ps):
        running = max(running, min(1.0, (3 - rank) * p))
        adjusted.setdefault(p, running)
    f0 = by_key["expect[0]"]
    assert f0["effect"] == pytest.approx(mean) and f0["p"] == pytest.approx(test.pvalue)
    assert (f0["ci_low"], f0["ci_high"]) == pytest.approx((mean - half, mean + half))
    assert f0["p_holm"] == pytest.approx(adjusted[test.pvalue]) and f0["n_pairs"] == 4
    assert f0["verdict"] == ("supported" if adjusted[test.pvalue] < 0.05 and mean > 0 else "inconclusive")
    assert f0["verdict"] == "supported"
    f1 = by_key["expect[1]"]
    lo, hi = em - stats.t.ppf(0.95, 3) * ese, em + stats.t.ppf(0.95, 3) * ese  # TOST at 0.05: the 90% CI
    assert (f1["ci_low"], f1["ci_high"]) == pytest.approx((lo, hi)) and f1["p"] == pytest.approx(tost)
    assert f1["ci_level"] == pytest.approx(0.90) and f1["method"] == "run"
    assert f1["verdict"] == ("supported" if adjusted[tost] < 0.05 and abs(em) < 0.05 else "inconclusive")
    # the same verdicts straight from the CSV rows
    again = findings_for(expect, {"tokens": ["cls", "patch"]}, rows)
    assert [f.verdict for f in again] == [f["verdict"] for f in data["findings"]]
    for f in data["findings"]:
        assert f"{f['key']}: {f['sentence']}" in report


def test_report_without_expectations_is_unchanged(tmp_path):
    from vlkit.ablate.report import write_report

    make_ablation(tmp_path, None, SYNTH)
    (tmp_path / "findings.json").write_text("{}")  # stale, from an earlier plan with expectations
    result = write_report(tmp_path)
    assert "Findings" not in (tmp_path / "report.md").read_text() and result["findings"] == []
    assert not (tmp_path / "findings.json").exists()


def test_power_note_for_a_zero_effect_names_no_absurd_seed_count():
    from vlkit.ablate.contrast import contrast
    from vlkit.ablate.findings import _power_note

    rows = rows_from({("patch",): [0.42, 0.44, 0.40], ("cls",): [0.42, 0.40, 0.44]}, ("tokens",))
    note = _power_note(contrast(rows, None, ["tokens"], "tokens", "patch", "cls", "accuracy"), 7)
    assert "no practical number of seeds" in note and "≤ 1,000" in note


def test_axis_spread_and_compare_with_another_study(tmp_path):
    """The report's spread per axis: best − worst arm mean, paired over seeds; --compare sets another study's beside
    it; a directory that is not a study is refused before anything is written."""
    from vlkit.ablate.report import write_report

    make_ablation(tmp_path / "a", None, SYNTH)
    other = {"cls": [dict(r, position_of_object=r["position_of_object"] + 0.01) for r in SYNTH["cls"]],
             "patch": SYNTH["cls"]}
    make_ablation(tmp_path / "b", None, other)
    result = write_report(tmp_path / "a", compare=[tmp_path / "b"])
    pos = next(s for s in result["spreads"] if s["metric"] == "acc/position_of_object")
    cls, patch = ([r["position_of_object"] for r in SYNTH[t]] for t in ("cls", "patch"))
    assert (pos["best"], pos["worst"]) == ("patch", "cls") and pos["spread"] == pytest.approx(
        sum(patch) / 4 - sum(cls) / 4)
    assert pos["p"] == pytest.approx(stats.ttest_rel(patch, cls).pvalue) and pos["n"] == 4
    tie = next(s for s in result["spreads"] if s["metric"] == "acc/count")  # every arm 0.8: two distinct arms
    assert tie["spread"] == 0 and tie["best"] != tie["worst"]
    report = (tmp_path / "a" / "report.md").read_text()
    assert "## How far each axis moves each metric" in report and "## Compared with other studies" in report
    assert f"synthetic (`{tmp_path / 'b'}`) | tokens | acc/position_of_object | 0.010 |" in report
    before = report
    res = vlkit("report", str(tmp_path / "a"), "--compare", str(tmp_path / "nope"), check=False)
    assert res.returncode != 0 and "nope is not an ablation directory" in res.stdout + res.stderr
    assert (tmp_path / "a" / "report.md").read_text() == before
    # a study kept without its run directories (as committed under docs/examples): read from its results.json
    import shutil

    write_report(tmp_path / "b")  # its results.json
    shutil.rmtree(tmp_path / "b" / "runs")
    write_report(tmp_path / "a", compare=[tmp_path / "b"])
    assert (tmp_path / "a" / "report.md").read_text() == before  # the same numbers as from the run directories
    (tmp_path / "b" / "results.json").unlink()
    res = vlkit("report", str(tmp_path / "a"), "--compare", str(tmp_path / "b"), check=False)
    assert res.returncode != 0 and "neither run directories (runs/) nor results.json" in res.stdout + res.stderr
