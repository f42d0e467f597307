"""A study's report: report.md (Findings first when the recipe declares ``expect:``, then the results table, paired
comparisons, axis spreads, other studies beside this one, where the time went) and findings.json.

Layers, bottom up: expect.py (the ``expect:`` grammar), stats.py (paired tests, intervals, Holm, power, the crossed
seed × question variance), pairing.py (runs paired by seed; answers paired by question), contrast.py (one contrast
at question or run level), findings.py (expectations judged), results.py (rows from run directories),
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
from vlkit.ablate.contrast import QUESTION_METHOD, RUN_LEVEL_METHOD
from vlkit.ablate.results import (TIME_PHASES, collect, kept_rows, load_answers, load_plan, plan_axes, study_rows,
                                  write_results)
from vlkit.ablate.tables import aggregate, axis_spreads, comparisons, metric_columns, variance_sources


def analysis_line(rows: list[dict[str, Any]], answers: dict[str, Any]) -> str:
    """Which analysis the runs allow: question level when they kept their answers, else run level, and why."""
    finished = [str(r["run"]) for r in rows if r.get("status") == "finished"]
    kept = sum(run in answers for run in finished)
    if finished and kept == len(finished):
        return (f"Analysis: **question level** — all {kept} finished runs kept their answers "
                f"(`predictions_<stage>.jsonl`), so accuracy contrasts use every question: {QUESTION_METHOD}. Other "
                f"metrics (losses, BLEU) stay at run level: {RUN_LEVEL_METHOD}.")
    if kept == 0:
        return (f"Analysis: **run level** — none of the {len(finished)} finished runs has its answers "
                "(`predictions_<stage>.jsonl`: runs made before vlkit kept them), so every contrast is a "
                f"{RUN_LEVEL_METHOD}; a question-level analysis needs the runs made again.")
    return (f"Analysis: **mixed** — {kept} of {len(finished)} finished runs kept their answers; a contrast is at "
            "question level only where every paired run has them (the table's `level` column), else run level.")


def findings_markdown(findings: list[Finding], analysis: str = "", exploratory: str = "") -> list[str]:
    """The report's Findings section: how they were computed, a table, then each verdict in one sentence."""
    family = sum(f.verdict != "not tested" for f in findings)
    lines = ["## Findings", ""]
    if exploratory:
        lines += [f"**Exploratory.** {exploratory}", ""]
    lines += ["The study's declared expectations (`expect:` in its recipe), tested on paired runs: the two arms are "
              "paired by seed within each setting of the other axes. Effect = a − b (a trend: its deciding planned "
              "contrast). `>` / `<`: 95% CI and two-sided p. `~` (±m): two one-sided tests at α = 0.05 with the 90% "
              "CI; p is the TOST p (the non-equivalence p when the estimate lies beyond ±m). `>=` (±m), non-inferiority: "
              "the one-sided test that a − b > −m at α = 0.05 with the 90% CI (`<=`: a − b < +m). Trends: knee vs start "
              "and each later value vs the knee within ±m, p the largest of theirs. Every p is Holm-corrected "
              f"across the {family} tested expectation(s). Rules: README, section Hypotheses.", ""]
    if analysis:
        lines += [analysis, ""]
    lines += ["| key | expectation | effect | CI | p | Holm p | pairs | level | verdict |",
              "|---|---|---|---|---|---|---|---|---|"]
    for f in findings:
        ci = "" if f.ci_low is None or math.isnan(f.ci_low) else \
            f"{fmt_effect(f.ci_low)} to {fmt_effect(f.ci_high)} ({f.ci_level:.0%})"
        effect = "" if f.effect is None else fmt_effect(f.effect)
        level = "" if f.verdict == "not tested" else (f"question ({f.questions} q)" if f.method == "question" else "run")
        lines.append(f"| {f.key} | `{f.text}` | {effect} | {ci} | {fmt_p(f.p)} | {fmt_p(f.p_holm)} | {f.n_pairs} | "
                     f"{level} | **{f.verdict}** |")
    lines.append("")
    for f in findings:
        lines.append(f"- {f.key}: {f.sentence}" + (f" {f.power_note}" if f.power_note else ""))
    return lines + [""]


def exploratory_line(plan: dict[str, Any]) -> str:
    """Why a study's p-values are exploratory: seeds added after a report had been read (plan.json's
    ``extended``); vlkit has no alpha-spending plan to declare, so no such study is confirmatory."""
    ext = plan.get("extended") or []
    if not ext:
        return ""
    steps = "; ".join(f"seeds {e['from']} → {e['to']}" for e in ext)
    return (f"Seeds were added after a report of this study had been written ({steps}). Its p-values assume one "
            "look at the data; with a look before the extension they overstate the evidence (no alpha-spending "
            "plan was declared), so these Findings are exploratory, for planning a confirmatory study.")


def variance_markdown(sources: list[dict[str, Any]]) -> list[str]:
    """Per metric: a run's accuracy variance split into evaluation sampling and training seed."""
    if not sources:
        return []
    lines = ["", "## Where the variance comes from", "",
             "A run's accuracy varies with the questions it is scored on and with its training seed. Evaluation "
             "sampling: a trained model's accuracy on n questions drawn from the generator varies binomially, "
             "p(1 − p)/n. Training seed: the variance across seeds on the same questions, pooled within "
             "configurations. More questions shrink the first (cheap); only more seeds average the second (costly). "
             "p: do the seeds spread more than binomial noise at this n would (χ², one-sided)?", "",
             "| metric | questions per run | evaluation SD | seed SD | run SD | share from evaluation | p | "
             "to shrink it |", "|---|---|---|---|---|---|---|---|"]
    for v in sources:
        n = f"{v['questions']}" + (" (inferred)" if v["n_source"] == "inferred" else "")
        share = v["share_evaluation"]
        advice = "add questions" if share >= 0.5 else "add seeds"
        lines.append(f"| {v['metric']} | {n} | {math.sqrt(v['evaluation']):.3f} | {math.sqrt(v['seed']):.3f} | "
                     f"{math.sqrt(v['total']):.3f} | {share:.0%} | {fmt_p(v['p_seed'])} | {advice} |")
    if any(v["n_source"] == "inferred" for v in sources):
        lines += ["", "(inferred): the runs did not record their number of questions (made before vlkit did); n is "
                  "the smallest count that makes every accuracy of the metric a whole number of correct answers."]
    return lines


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
             "a time)." + _reused_time_note(timed), "", "| phase | s per run | share |", "|---|---|---|"]
    for k, what in [*TIME_PHASES.items(), ("other", "process start, imports, run directory, writing results")]:
        v = other if k == "other" else mean[k]
        lines.append(f"| {what} | {v:.1f} | {v / mean['t_run']:.0%} |")
    lines.append(f"| **whole run** | {mean['t_run']:.1f} | 100% |")
    return lines


def _reused_time_note(timed: list[dict[str, Any]]) -> str:
    reused = sum(1 for r in timed if r.get("reused_from"))
    if not reused:
        return ""
    return (f" {reused} of them were taken from other studies (`--reuse`): their time is what they took where they "
            "were made, not part of this study's wall time.")


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
    """Sort key for axis values: numbers numerically (1, 4, 16, 64) -- also when they come back as text, as from
    results.csv -- then everything else by text."""
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            pass
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


AT_READER = 0.10  # an arm within this of the position-blind reader on a spatial type reads no position there


def references_markdown(rows: list[dict[str, Any]], agg: list[dict[str, Any]], axes: list[str]) -> list[str]:
    """Per question type, the references the evaluated questions carry (blind, position-blind reader), and for
    each configuration its mean accuracy minus the reader's, marked where a spatial type is at the reader's level
    (the configuration reads no more of *where* than a pooled token could). Empty for runs without references."""
    done = [r for r in rows if r.get("status") == "finished" and any(k.startswith("ref/") for k in r)]
    if not done:
        return []
    spatial = set(str(done[0].get("spatial_types", "")).split())
    types = sorted({k.split("/", 2)[2] for k in done[0] if k.startswith("ref/position_blind/")})
    ref = {t: {n: done[0].get(f"ref/{n}/{t}") for n in ("blind", "position_blind")} for t in types}
    agg = sorted(agg, key=lambda a: tuple(axis_order(a.get(x)) for x in axes))  # the results table's order
    head = ["question type", "blind", "position-blind reader"] + [" / ".join(str(a.get(x)) for x in axes) for a in agg]
    lines = ["", "## References", "",
             f"Per question type: the blind answer and the position-blind reader (knows every object, not its cell) on "
             f"the same questions, then each configuration's mean accuracy minus the reader's. ◆ spatial type; "
             f"**at reader**: within +{AT_READER:.2f} of the reader on a spatial type.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in types:
        cells = [t + (" ◆" if t in spatial else ""), f"{ref[t]['blind']:.3f}", f"{ref[t]['position_blind']:.3f}"]
        for a in agg:
            mc = a.get(f"acc/{t}")
            if mc is None:
                cells.append("")
                continue
            diff = mc[0] - ref[t]["position_blind"]
            cells.append(f"{diff:+.3f}" + (" **at reader**" if t in spatial and diff < AT_READER else ""))
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
    worlds = sorted({str(r["toy_world"]) for r in rows if r.get("toy_world")})
    if worlds:
        lines += ["", "## Instrument", "", f"- toy world {', '.join(worlds)} (its pretraining config's hash, as in "
                  "vlkit/toyworld/weights/manifest.json for the shipped one)"]
        unknown = [r["run"] for r in rows if r["status"] == "finished" and not r.get("toy_world")]
        if unknown:
            lines.append(f"- {len(unknown)} run(s) made before vlkit recorded the toy world: "
                         + ", ".join(f"`{u}`" for u in unknown))
    reused = [r for r in rows if r.get("reused_from")]
    if reused:
        lines += ["", "## Runs taken from other studies (`--reuse`: same config, same toy world)", ""]
        lines += [f"- `{r['run']}` from `{r['reused_from']}`" for r in reused]
    mapped = sorted({r["mapping"] for r in rows if r.get("mapping")})
    if mapped:
        lines += ["", "## How combinations were mapped to models", ""] + [f"- {m}" for m in mapped]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return lines


def write_report(out: Path, command: str | None = None, compare: list[Path] | None = None) -> dict[str, Any]:
    """results.csv, results.json, report.md and plots from the run directories (a study kept without them: report.md
    and findings.json from its results.json); ``compare``: other studies' directories whose axis spreads are set
    beside this one's."""
    plan, _ = load_plan(out)
    axes = [a for a in plan["axes"]]
    if (out / "runs").is_dir():
        rows = collect(out)
        write_results(out, rows)
        plots = plot(out, rows, axes)
        if not any((out / "runs" / r["run"] / "metrics.jsonl").exists() for r in rows):
            # runs kept without their loss logs (docs/examples keep answers, not metrics.jsonl): the curves drawn
            # when the logs were there stay the record
            plots += [p for p in ("loss_curves.png",) if p not in plots and (out / p).exists()]
    else:  # a study kept without its runs (docs/examples): its results.json is the record, its plots stay
        rows = kept_rows(out)
        plots = [p for p in ("accuracy_vs_tokens.png", "loss_curves.png") if (out / p).exists()]
    agg = aggregate(rows, axes)
    comps = comparisons(rows, axes)
    lines = [f"# Ablation report: {plan['recipe']}", ""]
    if command or plan.get("command"):
        lines += ["Made with:", "", "```", command or plan["command"], "```", ""]
    answers = load_answers(out, rows)
    findings = write_findings(out, plan, rows, answers)
    if findings:
        lines += findings_markdown(findings, analysis_line(rows, answers), exploratory_line(plan))
    lines += results_table(rows, agg, axes, plan["seeds"])
    lines += references_markdown(rows, agg, axes)
    lines += variance_markdown(variance_sources(rows, axes))
    lines += comparisons_markdown(comps)
    spreads = axis_spreads(rows, axes)
    lines += spread_markdown(spreads)
    lines += compare_markdown(spreads, list(compare or []))
    lines += time_markdown(rows)
    lines += notes_markdown(rows, plots)
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
    return {"rows": rows, "aggregate": agg, "comparisons": comps, "plots": plots, "findings": findings,
            "spreads": spreads}


def write_findings(out: Path, plan: dict[str, Any], rows: list[dict[str, Any]],
                   answers: dict[str, Any] | None = None) -> list[Finding]:
    """Judge the plan's expectations on the rows (and the runs' answers) and write findings.json (removed when
    there are none)."""
    path = out / "findings.json"
    if not plan.get("expect"):
        path.unlink(missing_ok=True)
        return []
    findings = findings_for(plan["expect"], plan_axes(plan), rows, answers)
    data = findings_json(findings)
    if plan.get("extended"):
        data["exploratory"] = exploratory_line(plan)
    write_json_atomic(path, data)
    return findings
