"""Why the Findings' question-level test is a crossed variance-components t-test and not a two-way cluster bootstrap.

Simulates two arms of the same recipe (answers from per-question difficulties and per-seed skill, the logistic model
of tests/test_question_stats.py, the seed SD fitted to the committed studies) and counts false positives at
α = 0.05 of (a) the pigeonhole two-way cluster bootstrap — resample seed pairs and questions independently, 95%
percentile interval of the mean paired difference — and (b) vlkit's crossed test (vlkit/ablate/stats.py).

    python benchmarks/bench_calibration.py [--studies 1000] [--resamples 400]   # ~90 s on one shared core
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

from _common import environment, table, write_result  # noqa: E402
from test_question_stats import fitted_seed_sd, p_values, simulate  # noqa: E402


def bootstrap_rejects(rng: np.random.Generator, d: np.ndarray, resamples: int) -> bool:
    """Pigeonhole bootstrap of one (pairs × questions) table: 0 outside the 95% percentile interval."""
    k, q = d.shape
    w = rng.multinomial(k, [1 / k] * k, size=resamples).astype(float)
    v = rng.multinomial(q, [1 / q] * q, size=resamples).astype(float)
    stat = np.einsum("bk,kq,bq->b", w, d, v) / (k * q)
    lo, hi = np.percentile(stat, [2.5, 97.5])
    return bool(lo > 0 or hi < 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=1000)
    ap.add_argument("--resamples", type=int, default=400)
    ap.add_argument("--questions", type=int, default=50)
    ap.add_argument("--seed", type=int, default=99)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    fitted = fitted_seed_sd()
    rows, t0 = [], time.time()
    for k in (3, 5):
        for sd_armseed, sd_armq in [(0.0, 0.0), (fitted, 0.0), (fitted, 0.5)]:
            d = simulate(rng, args.studies, k, args.questions, sd_armseed, sd_armq=sd_armq)
            boot = np.mean([bootstrap_rejects(rng, t, args.resamples) for t in d])
            crossed = np.mean(p_values(d) < 0.05)
            rows.append([k, round(sd_armseed, 3), sd_armq, float(boot), float(crossed)])
    print(table(["seed pairs", "arm seed SD (logit)", "arm × question SD", "bootstrap FPR", "crossed FPR"], rows))
    print(f"\n{args.studies} studies per row, {args.resamples} resamples, {time.time() - t0:.0f} s")
    write_result("bench_calibration", {"args": vars(args), "rows": rows, "environment": environment()}, args.out)


if __name__ == "__main__":
    main()
