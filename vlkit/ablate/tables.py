"""A study's tables of numbers: per-configuration means with CIs, paired comparisons against each axis' first arm,
and how far each axis moves each metric. Pairs come from the one pairing table (vlkit/ablate/pairing.py)."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

from vlkit.ablate.grid import show_value
from vlkit.ablate.pairing import arm_table, arms
from vlkit.ablate.stats import mean_ci, number, paired_test, questions_behind, variance_split


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
            vals = [v for v in (number(r.get(col)) for r in rs) if v is not None]
            if vals:
                agg[col] = mean_ci(vals)
        out.append(agg)
    return out


def comparisons(rows: list[dict[str, Any]], axes: list[str]) -> list[dict[str, Any]]:
    """For each axis, each value vs the axis' first value, paired on seed and every other axis."""
    out = []
    for axis in axes:
        values = arms(rows, axis)
        tables = {col: arm_table(rows, axes, axis, col) for col in metric_columns(rows)} if len(values) > 1 else {}
        for v in values[1:]:
            for col, table in tables.items():
                first, other = table.get(show_value(values[0]), {}), table.get(show_value(v), {})
                shared = [k for k in first if k in other]
                if shared:
                    out.append({"axis": axis, "a": values[0], "b": v, "metric": col,
                                **paired_test([first[k] for k in shared], [other[k] for k in shared])})
    return out


def axis_spreads(rows: list[dict[str, Any]], axes: list[str]) -> list[dict[str, Any]]:
    """How far each axis moves each metric: its best arm minus its worst arm (arm means over seeds and the other
    axes), paired on seed and the other axes, with a 95% CI and p. The two arms are picked after seeing the data,
    so the difference is an upper estimate of what the axis does; its CI shows how much of it is seed noise."""
    out = []
    for axis in axes:
        values = arms(rows, axis)
        if len(values) < 2:
            continue
        label = {show_value(v): v for v in reversed(values)}  # an arm as the rows hold it (16, not '16')
        for col in metric_columns(rows):
            by_arm = arm_table(rows, axes, axis, col)
            means = {v: sum(xs.values()) / len(xs) for v, xs in by_arm.items() if xs}
            if len(means) < 2:
                continue
            best = max(means, key=means.get)
            worst = min((v for v in means if v != best), key=means.get)  # another arm, also when all arms tie
            shared = sorted(set(by_arm[best]) & set(by_arm[worst]), key=str)
            test = paired_test([by_arm[worst][k] for k in shared], [by_arm[best][k] for k in shared]) if shared \
                else {"diff": means[best] - means[worst], "ci": float("nan"), "p": float("nan"), "n": 0}
            out.append({"axis": axis, "metric": col, "best": label[best], "worst": label[worst],
                        "best_mean": means[best], "worst_mean": means[worst], "spread": means[best] - means[worst],
                        **test, "arms": len(means)})
    return out


def _questions(row: dict[str, Any], metric: str) -> int | None:
    """Questions a run answered for ``metric`` as it recorded them (``n/<type>`` columns; ``accuracy``: all)."""
    if metric == "accuracy":
        ns = [number(v) for k, v in row.items() if k.startswith("n/")]
        return int(sum(ns)) if ns and None not in ns else None  # type: ignore[arg-type]
    n = number(row.get("n/" + metric.removeprefix("acc/")))
    return None if n is None else int(n)


def variance_sources(rows: list[dict[str, Any]], axes: list[str]) -> list[dict[str, Any]]:
    """Per accuracy metric: how much of a run's variance is evaluation sampling (binomial at the run's number of
    questions) and how much the training seed (the spread across seeds on the same questions, pooled over the
    configurations; vlkit/ablate/stats.py, variance_split). Runs that did not record their number of questions get the smallest one their accuracies
    allow (``n_source``: inferred)."""
    finished = [r for r in rows if r.get("status") == "finished"]
    out = []
    for col in metric_columns(rows):
        groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
        for r in finished:
            if number(r.get(col)) is not None:
                groups[config_key(r, axes)].append(r)
        values = [[number(r[col]) for r in g] for g in groups.values()]
        ns = [[_questions(r, col) for r in g] for g in groups.values()]
        source = "recorded"
        if any(n is None for g in ns for n in g):
            guess = questions_behind([v for g in values for v in g])  # type: ignore[misc]
            if guess is None:
                continue
            ns, source = [[guess] * len(g) for g in values], "inferred"
        split = variance_split(values, ns)  # type: ignore[arg-type]
        if split["df"] > 0:
            n_all = sorted({n for g in ns for n in g})
            out.append({"metric": col, "questions": n_all[0] if len(n_all) == 1 else n_all, "n_source": source,
                        **split})
    return out
