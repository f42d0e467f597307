"""A study's plots: accuracy against image tokens, and every run's loss curve."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from vlkit.ablate.tables import aggregate


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
