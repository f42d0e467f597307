"""References on held-out questions: what e.g. a blind model or a position-blind reader scores on each question,
carried by the records (``rec["references"]``, written by the toy world's generator), averaged like an accuracy."""
from __future__ import annotations

from collections import defaultdict
from typing import Any


def reference_report(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The references the records carry (``rec["references"]``: what e.g. a blind or a position-blind reader
    scores on that question, 0..1), averaged overall and per ``question_type``, and the types whose records are
    marked ``spatial``. Records without references give empty results (any LLaVA file)."""
    by_type: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    overall: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    spatial = set()
    for rec in records:
        qtype = str(rec.get("question_type", "all"))
        counts[qtype] += 1
        if rec.get("spatial"):
            spatial.add(qtype)
        for name, value in (rec.get("references") or {}).items():
            by_type[qtype][name].append(float(value))
            overall[name].append(float(value))
    full = {name for name, v in overall.items() if len(v) == len(records)}  # only references every record has
    return {"references": {n: round(sum(overall[n]) / len(overall[n]), 4) for n in sorted(full)},
            "references_by_type": {t: {n: round(sum(v[n]) / len(v[n]), 4) for n in sorted(full)}
                                   for t, v in sorted(by_type.items())},
            "count_by_type": dict(sorted(counts.items())), "spatial_types": sorted(spatial)}
