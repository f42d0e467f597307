"""A study's results: its plan, one row per run read from the run directories, results.csv and results.json."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from vlkit._atomic import read_json, write_json_atomic, write_text_atomic
from vlkit.ablate.grid import RunSpec, show_value
from vlkit.ablate.run import run_status
from vlkit.train.summary import recorded_world


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


def kept_rows(out: Path) -> list[dict[str, Any]]:
    """Every row of a study's results.json (a study kept without its run directories)."""
    path = out / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{out} has neither run directories (runs/) nor results.json")
    rows = read_json(path, f"Regenerate it with `vlkit report {out}` (needs its runs/)")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "run" in r and "status" in r for r in rows):
        raise ValueError(f"{path} is not a list of runs; regenerate it with `vlkit report {out}` (needs its runs/)")
    return rows


def _last_stage(summary: dict[str, Any]) -> dict[str, Any]:
    stages = summary.get("stages", {})
    return stages[list(stages)[-1]] if stages else {}


def collect(out: Path) -> list[dict[str, Any]]:
    """One row per run: axes, seed, status, metrics of the last stage, cost."""
    plan, specs = load_plan(out)
    rows = []
    for s in specs:
        rd = out / "runs" / s.id
        row: dict[str, Any] = {"run": s.id, **{k: show_value(v) for k, v in s.axes.items()}, "seed": s.seed,
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
            for qt, n in (last.get("count_by_type") or {}).items():
                row[f"n/{qt}"] = n  # questions of the type the run answered (the evaluation's binomial n)
            for qt, refs in (last.get("references_by_type") or {}).items():
                for name, value in refs.items():  # what e.g. a position-blind reader scores on the same questions
                    row[f"ref/{name}/{qt}"] = value
            if last.get("spatial_types"):
                row["spatial_types"] = " ".join(last["spatial_types"])
            row.update(time_columns(summary, rd))
            world = recorded_world(rd)
            if world:
                row["toy_world"] = world  # the instrument's version (vlkit/ablate/reuse.py)
            if (rd / "reused.json").exists():
                row["reused_from"] = read_json(rd / "reused.json", "Delete it: the run then counts as made here").get("from", "")
        rows.append(row)
    return rows


def load_answers(out: Path, rows: list[dict[str, Any]]) -> dict[str, dict[str, tuple[str, bool]]]:
    """Each finished run's answers from its last stage's ``predictions_<stage>.jsonl`` (run id -> {question id:
    (question type, correct)}); runs made before vlkit kept answers have none and are left out."""
    from vlkit.evaluate import predictions_path, read_predictions

    answers: dict[str, dict[str, tuple[str, bool]]] = {}
    for row in rows:
        rd = out / "runs" / str(row["run"])
        if row.get("status") != "finished" or not (rd / "summary.json").exists():
            continue
        stages = list(read_json(rd / "summary.json", "Run the grid again: the run rebuilds it").get("stages", {}))
        path = predictions_path(rd, stages[-1]) if stages else None
        if path is not None and path.exists():
            answers[str(row["run"])] = {str(r["id"]): (str(r["question_type"]), bool(r["correct"]))
                                        for r in read_predictions(path)}
    return answers


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


def _mean(xs: list[Any]) -> float | None:
    xs = [x for x in xs if isinstance(x, (int, float))]
    return sum(xs) / len(xs) if xs else None


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


def plan_axes(plan: dict[str, Any]) -> dict[str, list[Any]]:
    """Each axis of a plan with its values in the order declared (as results.csv shows them)."""
    return {a: list(dict.fromkeys(show_value(r["axes"].get(a)) for r in plan["runs"])) for a in plan["axes"]}
