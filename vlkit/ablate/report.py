"""A study's report: report.md (Findings first when the recipe declares ``expect:``, then the results table, paired
comparisons, axis spreads, other studies beside this one, where the time went) and findings.json.

Layers, bottom up: expect.py (the ``expect:`` grammar), stats.py (paired tests, intervals, Holm, power),
pairing.py (runs paired by seed), findings.py (expectations judged), results.py (rows from run directories),
tables.py (means, comparisons, spreads), plots.py, and this module, which only writes text.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from vlkit._atomic import write_json_atomic, write_text_atomic
from vlkit.ablate.findings import Finding, findings_for, findings_json, fmt_effect, fmt_p
from vlkit.ablate.plots import plot
from vlkit.ablate.results import TIME_PHASES, collect, load_plan, plan_axes, study_rows, write_results
from vlkit.ablate.tables import aggregate, axis_spreads, comparisons, metric_columns


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
        ci = "" if f.ci_low is None or math.isnan(f.ci_low) else f"{fmt_effect(f.ci_low)} to {fmt_effect(f.ci_high)}"
        effect = "" if f.effect is None else fmt_effect(f.effect)
        lines.append(f"| {f.key} | `{f.text}` | {effect} | {ci} | {fmt_p(f.p)} | {fmt_p(f.p_holm)} | {f.n_pairs} | "
                     f"**{f.verdict}** |")
    lines.append("")
    for f in findings:
        lines.append(f"- {f.key}: {f.sentence}" + (f" {f.power_note}" if f.power_note else ""))
    return lines + [""]


def time_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """Mean seconds per finished run in each phase, and its share of the run."""
    timed = [r for r in rows if r["status"] == "finished" and "t_run" in r]
    if not timed:
        return []
    n = len(timed)
    mean = {k: sum(r[k] for r in timed) / n for k in [*TIME_PHASES, "t_run"]}
    other = mean["t_run"] - sum(mean[k] for k in TIME_PHASES)
    lines = ["", "## Where the time went", "",
             f"Mean seconds per run over {n} finished run(s) (each run is its own process; the grid ran them "
             "side by side, so the study's wall time is about the sum of its runs' times divided by the runs at "
             "a time).", "", "| phase | s per run | share |", "|---|---|---|"]
    for k, what in [*TIME_PHASES.items(), ("other", "process start, imports, run directory, writing results")]:
        v = other if k == "other" else mean[k]
        lines.append(f"| {what} | {v:.1f} | {v / mean['t_run']:.0%} |")
    lines.append(f"| **whole run** | {mean['t_run']:.1f} | 100% |")
    return lines


def _spread_cells(s: dict[str, Any]) -> list[str]:
    ci = "" if math.isnan(s["ci"]) else f"± {s['ci']:.3f}"
    p = "n/a" if math.isnan(s["p"]) else f"{s['p']:.3g}"
    return [f"{s['spread']:.3f}", f"{s['best']} ({s['best_mean']:.3f})", f"{s['worst']} ({s['worst_mean']:.3f})",
            f"{s['diff']:+.3f} {ci}".strip(), p]


def spread_markdown(spreads: list[dict[str, Any]]) -> list[str]:
    if not spreads:
        return []
    lines = ["", "## How far each axis moves each metric", "",
             "Spread = best arm's mean − worst arm's mean; the paired column is the same difference over matched "
             "seeds with its 95% CI. Both arms are chosen after seeing the data, so a spread is an upper estimate "
             "of the axis' effect; a CI that reaches 0 means seed noise alone could give it.", "",
             "| axis | metric | spread | best arm | worst arm | paired best − worst | p |", "|---|---|---|---|---|---|---|"]
    for s in spreads:
        lines.append(f"| {s['axis']} | {s['metric']} | " + " | ".join(_spread_cells(s)) + " |")
    return lines


def compare_markdown(spreads: list[dict[str, Any]], others: list[Path]) -> list[str]:
    """This study's axis spreads beside other studies' (``--compare DIR``), on the metrics they all share."""
    if not others:
        return []
    groups = [("this study", spreads)]
    for other in map(Path, others):
        plan, rows = study_rows(other)
        groups.append((f"{plan.get('recipe', other.name)} (`{other}`)", axis_spreads(rows, list(plan["axes"]))))
    shared = set.intersection(*({s["metric"] for s in g} for _, g in groups))
    if not shared:
        names = ", ".join(f"`{o}`" for o in others)
        return ["", "## Compared with other studies", "",
                f"No metric is moved by an axis both in this study and in {names} (a study needs an axis with two "
                "or more finished arms), so there is nothing to set side by side."]
    lines = ["", "## Compared with other studies", "",
             "Each study's axes by how far they move a metric (spread as in the section above); the other studies' "
             "runs are read from their directories (or their results.json), not rerun.", "",
             "| study | axis | metric | spread | best arm | worst arm | paired best − worst | p |",
             "|---|---|---|---|---|---|---|---|"]
    for metric in [m for m in metric_columns([{m: 0 for m in shared}]) if m in shared]:
        for label, group in groups:
            for s in group:
                if s["metric"] == metric:
                    lines.append(f"| {label} | {s['axis']} | {metric} | " + " | ".join(_spread_cells(s)) + " |")
    return lines


def axis_order(v: Any) -> tuple:
    """Sort key for axis values: numbers numerically (1, 4, 16, 64), then everything else by text."""
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def fmt_mean_ci(mc: Any) -> str:
    if not isinstance(mc, tuple):
        return "" if mc is None else str(mc)
    m, hw = mc
    return f"{m:.3f}" if math.isnan(hw) else f"{m:.3f} ± {hw:.3f}"


def results_table(rows: list[dict[str, Any]], agg: list[dict[str, Any]], axes: list[str], seeds: Any) -> list[str]:
    """The run counts, then one row per configuration: mean ± 95% CI of each metric across seeds."""
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[r["status"]] += 1
    metrics = metric_columns(rows)
    lines = [f"Runs: {len(rows)} ({', '.join(f'{v} {k}' for k, v in counts.items())}); seeds: {seeds}. "
             "Accuracy is normalised exact match of generated answers on the last stage's evaluation set; "
             "cells are mean ± 95% CI (t) across seeds.", ""]
    head = axes + ["image tokens", "trainable params", "seeds"] + metrics + ["val loss", "tokens/s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in sorted(agg, key=lambda a: tuple(axis_order(a.get(x)) for x in axes)):
        cells = [str(a.get(x)) for x in axes] + [str(a.get("image_tokens")), f"{a.get('trainable_params') or 0:,}",
                                                 str(a["seeds"])]
        cells += [fmt_mean_ci(a.get(m)) for m in metrics] + [fmt_mean_ci(a.get("val_loss")),
                                                              fmt_mean_ci(a.get("tokens_per_s"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def comparisons_markdown(comps: list[dict[str, Any]]) -> list[str]:
    if not comps:
        return []
    lines = ["", "## Paired comparisons (same seed and other axes)", "",
             "| axis | a | b | metric | b − a | 95% CI | p (paired t) | pairs |", "|---|---|---|---|---|---|---|---|"]
    for c in comps:
        ci = "" if math.isnan(c["ci"]) else f"± {c['ci']:.3f}"
        p = "n/a" if math.isnan(c["p"]) else f"{c['p']:.3g}"
        lines.append(f"| {c['axis']} | {c['a']} | {c['b']} | {c['metric']} | {c['diff']:+.3f} | {ci} | {p} | {c['n']} |")
    return lines


def notes_markdown(rows: list[dict[str, Any]], plots: list[str]) -> list[str]:
    """Skipped and failed runs, how grid combinations were mapped to models, the plots."""
    lines: list[str] = []
    skipped = [r for r in rows if r["status"] in ("skipped", "failed")]
    if skipped:
        lines += ["", "## Skipped and failed runs", ""]
        lines += [f"- `{r['run']}` ({r['status']}): {str(r.get('error', '')).splitlines()[-1] if r.get('error') else ''}"
                  for r in skipped]
    mapped = sorted({r["mapping"] for r in rows if r.get("mapping")})
    if mapped:
        lines += ["", "## How combinations were mapped to models", ""] + [f"- {m}" for m in mapped]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return lines


def write_report(out: Path, command: str | None = None, compare: list[Path] | None = None) -> dict[str, Any]:
    """results.csv, results.json, report.md and plots from the run directories; ``compare``: other studies'
    directories whose axis spreads are set beside this one's."""
    plan, _ = load_plan(out)
    axes = [a for a in plan["axes"]]
    rows = collect(out)
    write_results(out, rows)
    agg = aggregate(rows, axes)
    comps = comparisons(rows, axes)
    plots = plot(out, rows, axes)
    lines = [f"# Ablation report: {plan['recipe']}", ""]
    if command or plan.get("command"):
        lines += ["Made with:", "", "```", command or plan["command"], "```", ""]
    findings = write_findings(out, plan, rows)
    if findings:
        lines += findings_markdown(findings)
    lines += results_table(rows, agg, axes, plan["seeds"])
    lines += comparisons_markdown(comps)
    spreads = axis_spreads(rows, axes)
    lines += spread_markdown(spreads)
    lines += compare_markdown(spreads, list(compare or []))
    lines += time_markdown(rows)
    lines += notes_markdown(rows, plots)
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
    return {"rows": rows, "aggregate": agg, "comparisons": comps, "plots": plots, "findings": findings,
            "spreads": spreads}


def write_findings(out: Path, plan: dict[str, Any], rows: list[dict[str, Any]]) -> list[Finding]:
    """Judge the plan's expectations on the rows and write findings.json (removed when there are none)."""
    path = out / "findings.json"
    if not plan.get("expect"):
        path.unlink(missing_ok=True)
        return []
    findings = findings_for(plan["expect"], plan_axes(plan), rows)
    write_json_atomic(path, findings_json(findings))
    return findings
