"""Small helpers shared by tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# A few-step version of the embedded default for tests (the tiny toy world has 600 training images).
FAST = [
    "stages.align.max_steps=3", "stages.align.batch_size=4", "stages.align.eval_max_samples=8",
    "stages.instruct.max_steps=6", "stages.instruct.batch_size=4", "stages.instruct.eval_max_samples=8",
    "stages.align.eval_batch_size=8", "stages.instruct.eval_batch_size=8", "data.max_length=224",
]


def vlkit(*args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    res = subprocess.run([sys.executable, "-m", "vlkit.cli", *args], capture_output=True, text=True, env=env,
                         timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"vlkit {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def losses(run_dir: Path) -> list[tuple[str, int, float]]:
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in rows if "loss" in r]
