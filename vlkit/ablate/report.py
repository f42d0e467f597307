"""Aggregate a grid's run directories: results.csv/json, report.md with seed statistics, PNG plots; and, when the
recipe declares expectations, findings.json and a Findings section first in report.md (vlkit/ablate/hypotheses.py)."""
from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from vlkit._atomic import read_json, write_json_atomic, write_text_atomic
from vlkit.ablate.grid import RunSpec
from vlkit.ablate.hypotheses import Finding, findings_for, findings_json, findings_markdown
from vlkit.ablate.run import run_status


def load_plan(out: Path) -> tuple[dict[str, Any], list[RunSpec]]:
    path = out / "plan.json"
    if not path.exists():
        raise FileNotFoundError(f"{out} is not an ablation directory (no plan.json); run `vlkit ablate` first")
    plan = read_json(path, "Run the same `vlkit ablate` command again to write it (finished runs are kept)")
    return plan, [RunSpec(**s) for s in plan["runs"]]


def study_rows(out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Another study's plan and finished rows, for ``--compare``: from its run directories, or, where they are gone
    (a study archived or committed without ``runs/``, as under docs/examples), from the results.json it wrote."""
    plan, _ = load_plan(out)
    if (out / "runs").is_dir():
        rows = collect(out)
    elif (out / "results.json").exists():
        rows = read_json(out / "results.json", f"Regenerate it with `vlkit report {out}` (needs its runs/)")
        if not isinstance(rows, list):
            raise ValueError(f"{out / 'results.json'} is not a list of runs; regenerate it with `vlkit report {out}`")
    else:
        raise FileNotFoundError(f"{out} has neither run directories (runs/) nor results.json: nothing to compare with")
    finished = [r for r in rows if isinstance(r, dict) and r.get("status") == "finished"]
    if not finished:
        raise ValueError(f"{out} has no finished runs to compare with; finish it with the `vlkit ablate` command in "
                         f"its plan.json ({plan.get('command', 'vlkit ablate ...')})")
    return plan, finished


def _last_stage(summary: dict[str, Any]) -> dict[str, Any]:
    stages = summary.get("stages", {})
    return stages[list(stages)[-1]] if stages else {}


def collect(out: Path) -> list[dict[str, Any]]:
    """One row per run: axes, seed, status, metrics of the last stage, cost."""
    plan, specs = load_plan(out)
    rows = []
    for s in specs:
        rd = out / "runs" / s.id
        row: dict[str, Any] = {"run": s.id, **{k: _show(v) for k, v in s.axes.items()}, "seed": s.seed,
                               "mapping": s.mapping or "", "status": "skipped" if s.skipped else run_status(rd)}
        if s.skipped:
            row["error"] = s.skipped
        elif row["status"] == "failed":
            row["error"] = read_json(rd / "status.json", "Delete it: the run then counts as incomplete").get("error", "")[-500:]
        summary_path = rd / "summary.json"
        if summary_path.exists() and row["status"] == "finished":
            summary = read_json(summary_path, "Run the grid again: the run rebuilds it from its checkpoints")
            last = _last_stage(summary)
            stages = summary.get("stages", {})
            row.update({
                "accuracy": last.get("accuracy"), "val_loss": last.get("val_loss"), "final_loss": last.get("final_loss"),
                "bleu": last.get("bleu"), "image_tokens": summary.get("num_image_tokens"),
                "trainable_params": last.get("trainable_params"),
                "tokens_per_s": _mean([st.get("tokens_per_s") for st in stages.values()]),
                "wall_time_s": summary.get("wall_time_s"),
            })
            for qt, acc in (last.get("accuracy_by_type") or {}).items():
                row[f"acc/{qt}"] = acc
            row.update(time_columns(summary, rd))
        rows.append(row)
    return rows


TIME_PHASES = {"t_build": "model build (encoder, LLM, tokenizer from their weights)",
               "t_checks": "data checks (every record of each stage's data file)",
               "t_cache": "feature cache: look-up and encoding of missing images",
               "t_train": "training steps (with any mid-stage evaluations)",
               "t_eval": "evaluation after each stage (generation)"}


def time_columns(summary: dict[str, Any], rd: Path) -> dict[str, float]:
    """Where a run's time went, in seconds: summed over stages, and ``t_run`` the whole process as the grid's
    executor timed it (so ``t_run`` minus the phases is process start, imports and writing results)."""
    stages = [st.get("time_s") for st in summary.get("stages", {}).values()]
    if not stages or not all(stages) or "build_s" not in summary:
        return {}  # a run made before vlkit recorded its phases
    out = {"t_build": summary["build_s"]}
    for col, key in (("t_checks", "checks_s"), ("t_cache", "cache_s"), ("t_train", "train_s"), ("t_eval", "eval_s")):
        out[col] = sum(st.get(key, 0.0) for st in stages)
    status = rd / "status.json"
    run_s = read_json(status, "Delete it: the run then counts as incomplete").get("wall_time_s") if status.exists() else None
    if isinstance(run_s, (int, float)):
        out["t_run"] = run_s
    return out


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


def _show(v: Any) -> Any:
    return "+".join(map(str, v)) if isinstance(v, list) else v


def _mean(xs: list[Any]) -> float | None:
    xs = [x for x in xs if isinstance(x, (int, float))]
    return sum(xs) / len(xs) if xs else None


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


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    cols = sorted({k for r in rows for k in r if k.startswith("acc/")})
    return ["accuracy"] + cols


def config_key(row: dict[str, Any], axes: list[str]) -> tuple:
    return tuple(row.get(a) for a in axes)


def aggregate(rows: list[dict[str, Any]], axes: list[str]) -> list[dict[str, Any]]:
    """Mean ± 95% CI across seeds for each configuration."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["status"] == "finished":
            groups[config_key(r, axes)].append(r)
    out = []
    for key, rs in groups.items():
        agg: dict[str, Any] = dict(zip(axes, key))
        agg["seeds"] = len(rs)
        agg["image_tokens"] = rs[0].get("image_tokens")
        agg["trainable_params"] = rs[0].get("trainable_params")
        for col in metric_columns(rows) + ["val_loss", "tokens_per_s", "wall_time_s"]:
            vals = [r[col] for r in rs if isinstance(r.get(col), (int, float))]
            if vals:
                agg[col] = mean_ci(vals)
        out.append(agg)
    return out


def comparisons(rows: list[dict[str, Any]], axes: list[str]) -> list[dict[str, Any]]:
    """For each axis, each value vs the axis' first value, paired on seed and every other axis."""
    finished = [r for r in rows if r["status"] == "finished"]
    out = []
    for axis in axes:
        values = list(dict.fromkeys(r.get(axis) for r in finished))
        if len(values) < 2:
            continue
        others = [a for a in axes if a != axis] + ["seed"]
        index = {(r.get(axis), config_key(r, others)): r for r in finished}
        for v in values[1:]:
            for col in metric_columns(rows):
                a, b = [], []
                for (val, ctx), r in index.items():
                    if val != values[0] or (v, ctx) not in index:
                        continue
                    ra, rb = r.get(col), index[(v, ctx)].get(col)
                    if isinstance(ra, (int, float)) and isinstance(rb, (int, float)):
                        a.append(ra)
                        b.append(rb)
                if a:
                    out.append({"axis": axis, "a": values[0], "b": v, "metric": col, **paired_test(a, b)})
    return out


def axis_spreads(rows: list[dict[str, Any]], axes: list[str]) -> list[dict[str, Any]]:
    """How far each axis moves each metric: its best arm minus its worst arm (arm means over seeds and the other
    axes), paired on seed and the other axes, with a 95% CI and p. The two arms are picked after seeing the data,
    so the difference is an upper estimate of what the axis does; its CI shows how much of it is seed noise."""
    finished = [r for r in rows if r["status"] == "finished"]
    out = []
    for axis in axes:
        values = list(dict.fromkeys(r.get(axis) for r in finished))
        if len(values) < 2:
            continue
        others = [a for a in axes if a != axis] + ["seed"]
        for col in metric_columns(rows):
            by_arm: dict[Any, dict[tuple, float]] = defaultdict(dict)
            for r in finished:
                if isinstance(r.get(col), (int, float)):
                    by_arm[r.get(axis)][config_key(r, others)] = r[col]
            means = {v: sum(xs.values()) / len(xs) for v, xs in by_arm.items() if xs}
            if len(means) < 2:
                continue
            best = max(means, key=means.get)
            worst = min((v for v in means if v != best), key=means.get)  # another arm, also when all arms tie
            shared = sorted(set(by_arm[best]) & set(by_arm[worst]), key=str)
            test = paired_test([by_arm[worst][k] for k in shared], [by_arm[best][k] for k in shared]) if shared \
                else {"diff": means[best] - means[worst], "ci": float("nan"), "p": float("nan"), "n": 0}
            out.append({"axis": axis, "metric": col, "best": best, "worst": worst, "best_mean": means[best],
                        "worst_mean": means[worst], "spread": means[best] - means[worst], **test, "arms": len(means)})
    return out


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


def _order(v: Any) -> tuple:
    """Sort key for axis values: numbers numerically (1, 4, 16, 64), then everything else by text."""
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def _fmt(mc: Any) -> str:
    if not isinstance(mc, tuple):
        return "" if mc is None else str(mc)
    m, hw = mc
    return f"{m:.3f}" if math.isnan(hw) else f"{m:.3f} ± {hw:.3f}"


def write_results(out: Path, rows: list[dict[str, Any]]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(out / "results.csv", buf.getvalue())
    write_json_atomic(out / "results.json", rows)


def plot(out: Path, rows: list[dict[str, Any]], axes: list[str]) -> list[str]:
    """accuracy vs image tokens (one line per other-axes setting, CI error bars); loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    agg = aggregate(rows, axes)
    if agg:
        series_axes = [a for a in axes if a != "num_image_tokens"]
        fig, ax = plt.subplots(figsize=(6, 4))
        series: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
        for a in agg:
            series[tuple(a.get(x) for x in series_axes)].append(a)
        for key, pts in series.items():
            pts = sorted((p for p in pts if p.get("image_tokens") and "accuracy" in p), key=lambda p: p["image_tokens"])
            if not pts:
                continue
            xs = [p["image_tokens"] for p in pts]
            ys = [p["accuracy"][0] for p in pts]
            es = [0 if math.isnan(p["accuracy"][1]) else p["accuracy"][1] for p in pts]
            label = ", ".join(f"{k}={v}" for k, v in zip(series_axes, key)) or "all"
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("image tokens per image")
        ax.set_ylabel("accuracy (exact match), mean ± 95% CI")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "accuracy_vs_tokens.png", dpi=120)
        plt.close(fig)
        made.append("accuracy_vs_tokens.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    any_curve = False
    for r in rows:
        path = out / "runs" / r["run"] / "metrics.jsonl"
        if r["status"] != "finished" or not path.exists():
            continue
        pts = [json.loads(line) for line in path.read_text().splitlines()]
        pts = [p for p in pts if "loss" in p]
        if pts:
            ax.plot(range(1, len(pts) + 1), [p["loss"] for p in pts], lw=0.8, label=r["run"])
            any_curve = True
    if any_curve:
        ax.set_xlabel("optimizer step (all stages)")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        if len(rows) <= 12:
            ax.legend(fontsize=5)
        fig.tight_layout()
        fig.savefig(out / "loss_curves.png", dpi=120)
        made.append("loss_curves.png")
    plt.close(fig)
    return made


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
    metrics = metric_columns(rows)
    lines = [f"# Ablation report: {plan['recipe']}", ""]
    if command or plan.get("command"):
        lines += ["Made with:", "", "```", command or plan["command"], "```", ""]
    findings = write_findings(out, plan, rows)
    if findings:
        lines += findings_markdown(findings)
    counts = defaultdict(int)
    for r in rows:
        counts[r["status"]] += 1
    lines += [f"Runs: {len(rows)} ({', '.join(f'{v} {k}' for k, v in counts.items())}); seeds: {plan['seeds']}. "
              "Accuracy is normalised exact match of generated answers on the last stage's evaluation set; "
              "cells are mean ± 95% CI (t) across seeds.", ""]
    head = axes + ["image tokens", "trainable params", "seeds"] + metrics + ["val loss", "tokens/s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in sorted(agg, key=lambda a: tuple(_order(a.get(x)) for x in axes)):
        cells = [str(a.get(x)) for x in axes] + [str(a.get("image_tokens")), f"{a.get('trainable_params') or 0:,}",
                                                 str(a["seeds"])]
        cells += [_fmt(a.get(m)) for m in metrics] + [_fmt(a.get("val_loss")), _fmt(a.get("tokens_per_s"))]
        lines.append("| " + " | ".join(cells) + " |")
    if comps:
        lines += ["", "## Paired comparisons (same seed and other axes)", "",
                  "| axis | a | b | metric | b − a | 95% CI | p (paired t) | pairs |", "|---|---|---|---|---|---|---|---|"]
        for c in comps:
            ci = "" if math.isnan(c["ci"]) else f"± {c['ci']:.3f}"
            p = "n/a" if math.isnan(c["p"]) else f"{c['p']:.3g}"
            lines.append(f"| {c['axis']} | {c['a']} | {c['b']} | {c['metric']} | {c['diff']:+.3f} | {ci} | {p} | {c['n']} |")
    spreads = axis_spreads(rows, axes)
    lines += spread_markdown(spreads)
    lines += compare_markdown(spreads, list(compare or []))
    lines += time_markdown(rows)
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
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
    return {"rows": rows, "aggregate": agg, "comparisons": comps, "plots": plots, "findings": findings,
            "spreads": spreads}


def plan_axes(plan: dict[str, Any]) -> dict[str, list[Any]]:
    """Each axis of a plan with its values in the order declared (as results.csv shows them)."""
    return {a: list(dict.fromkeys(_show(r["axes"].get(a)) for r in plan["runs"])) for a in plan["axes"]}


def write_findings(out: Path, plan: dict[str, Any], rows: list[dict[str, Any]]) -> list[Finding]:
    """Judge the plan's expectations on the rows and write findings.json (removed when there are none)."""
    path = out / "findings.json"
    if not plan.get("expect"):
        path.unlink(missing_ok=True)
        return []
    findings = findings_for(plan["expect"], plan_axes(plan), rows)
    write_json_atomic(path, findings_json(findings))
    return findings
