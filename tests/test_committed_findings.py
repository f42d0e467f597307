"""Every committed study's Findings (docs/examples/*/findings.json) recomputed by a second, plain implementation
from its results.json: paired t (scipy), two one-sided tests, planned trend contrasts and Holm, written out here
without vlkit's statistics. The committed studies kept no answers, so this is the run-level path; the
question-level path has its own independent check in test_question_stats.py."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from scipy import stats

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples" / "v3"  # the previous world's studies (no answers kept)
STUDIES = ["cls_vs_patch", "cls_vs_patch/seeds5", "num_tokens", "projectors", "stages"]
ALPHA = 0.05


def paired(rows: list[dict], axes: list[str], axis: str, a: str, b: str, metric: str) -> list[float]:
    """a − b over runs paired by seed and every other axis."""
    def key(r):
        return tuple(str(r[x]) for x in axes if x != axis) + (str(r["seed"]),)

    va = {key(r): r[metric] for r in rows if str(r[axis]) == a and r["status"] == "finished"}
    vb = {key(r): r[metric] for r in rows if str(r[axis]) == b and r["status"] == "finished"}
    return [va[k] - vb[k] for k in sorted(set(va) & set(vb))]


def t_numbers(d: list[float], margin: float | None) -> dict[str, float]:
    n, m = len(d), sum(d) / len(d)
    se = stats.tstd(d) / math.sqrt(n)
    level = 0.95 if margin is None else 1 - 2 * ALPHA
    half = stats.t.ppf(0.5 + level / 2, n - 1) * se
    out = {"effect": m, "lo": m - half, "hi": m + half, "p": stats.ttest_1samp(d, 0).pvalue}
    if margin is not None:
        out["tost"] = max(stats.t.sf((m + margin) / se, n - 1), stats.t.sf((margin - m) / se, n - 1))
        out["outside"] = stats.t.sf((abs(m) - margin) / se, n - 1)
        out["claim"] = out["tost"] if abs(m) < margin else out["outside"]
    else:
        out["claim"] = out["p"]
    return out


def plain_holm(ps: list[float]) -> list[float]:
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    out, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        out[i] = running
    return out


def recompute(study: str) -> list[dict[str, object]]:
    rows = json.loads((EXAMPLES / study / "results.json").read_text())
    plan = json.loads((EXAMPLES / study / "plan.json").read_text())
    axes = plan["axes"]
    found = []
    for text in plan["expect"]:
        m = re.match(r"^(\S+) ([<>~]) (\S+) on (\S+)(?: \(±([0-9.]+)\))?$", text)
        if m:
            a, op, b, metric, margin = m.groups()
            axis = next(x for x in axes if a in {str(r[x]) for r in rows})
            t = t_numbers(paired(rows, axes, axis, a, b, metric), float(margin) if margin else None)
            found.append({"op": op, "margin": float(margin) if margin else None, **t})
            continue
        m = re.match(r"^(\S+) (increases|decreases) with (\S+) up to (\S+) then flat \(±([0-9.]+)\)$", text)
        assert m, text
        metric, direction, axis, knee, margin = m.groups()
        values = sorted({str(r[axis]) for r in rows}, key=float)
        rise = t_numbers(paired(rows, axes, axis, knee, values[0], metric), None)
        flats = [t_numbers(paired(rows, axes, axis, v, knee, metric), float(margin))
                 for v in values[values.index(knee) + 1:]]
        claims = [rise["p"]] + [f["tost"] for f in flats]
        decide = ([rise] + flats)[claims.index(max(claims))]
        found.append({"op": "trend", "margin": float(margin), "rise": rise, "flats": flats, "sign": 1 if
                      direction == "increases" else -1, **decide, "claim": max(claims)})
    for f, ph in zip(found, plain_holm([f["claim"] for f in found])):
        f["holm"] = ph
        f["verdict"] = verdict(f)
    return found


def verdict(f: dict) -> str:
    if f["op"] == "trend":
        against = plain_holm([f["rise"]["p"]] + [x["outside"] for x in f["flats"]])
        wrong = [f["sign"] * f["rise"]["effect"] < 0] + [abs(x["effect"]) >= f["margin"] for x in f["flats"]]
        if any(w and p < ALPHA for w, p in zip(wrong, against)):
            return "contradicted"
        inside = all(abs(x["effect"]) < f["margin"] for x in f["flats"])
        return "supported" if f["holm"] < ALPHA and f["sign"] * f["rise"]["effect"] > 0 and inside else "inconclusive"
    if f["holm"] >= ALPHA:
        return "inconclusive"
    if f["op"] == "~":
        return "supported" if abs(f["effect"]) < f["margin"] else "contradicted"
    return "supported" if (f["effect"] > 0) == (f["op"] == ">") else "contradicted"


@pytest.mark.parametrize("study", STUDIES)
def test_committed_findings_agree_with_a_plain_recomputation(study):
    committed = json.loads((EXAMPLES / study / "findings.json").read_text())["findings"]
    again = recompute(study)
    assert len(committed) == len(again)
    for c, f in zip(committed, again):
        assert c["method"] == "run" and c["verdict"] == f["verdict"], (study, c["key"])
        got = [c["effect"], c["ci_low"], c["ci_high"], c["p"], c["p_holm"]]
        want = [f["effect"], f["lo"], f["hi"], f["claim"], f["holm"]]
        assert [round(x, 3) for x in got] == [round(x, 3) for x in want], (study, c["key"])


def test_the_vlkit_path_gives_the_committed_findings():
    """findings_for on each results.json reproduces its committed findings.json (so the file is current)."""
    from vlkit.ablate.findings import findings_for
    from vlkit.ablate.results import plan_axes

    for study in STUDIES:
        plan = json.loads((EXAMPLES / study / "plan.json").read_text())
        rows = json.loads((EXAMPLES / study / "results.json").read_text())
        now = [f.to_dict() for f in findings_for(plan["expect"], plan_axes(plan), rows)]
        committed = json.loads((EXAMPLES / study / "findings.json").read_text())["findings"]
        assert now == committed, study


def test_the_cls_vs_patch_readme_states_the_recomputed_non_positional_differences():
    """The corrected sentence of docs/examples/v3/cls_vs_patch/README.md (5 seeds, patch − CLS, paired t): every
    number in it is the recomputation's."""
    readme = " ".join((EXAMPLES / "cls_vs_patch" / "README.md").read_text().split())
    rows = json.loads((EXAMPLES / "cls_vs_patch/seeds5/results.json").read_text())
    for metric in ("existence", "count_by_attribute", "count", "shape_of_colour"):
        d = paired(rows, ["tokens"], "tokens", "patch", "cls", f"acc/{metric}")
        effect = f"{sum(d) / len(d):+.3f}".replace("-", "−")
        p = f"p = {stats.ttest_1samp(d, 0).pvalue:.3g}"
        assert f"{effect}, {p}" in readme, (metric, effect, p)
    assert "CLS is equivalent or better" not in readme
