"""benchmarks/gpu_check.sh, the script a lent GPU runs, on this CPU with tiny configs: every phase runs and the
vlkit and transformers-Llava steps agree on the first loss (same weights, same batch)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_runs_every_phase_on_cpu_tiny(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny",
                          "--align-batch", "2", "--instruct-batch", "2", "--steps", "1"],
                         capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert out["errors"] == {}, out["errors"]
    assert "RANDOM WEIGHTS" in out["note"] and out["phases"]["build"]["random_weights"] == ["encoder", "llm"]
    for stage in ("align", "instruct"):
        v, h = out["phases"][f"vlkit_{stage}"], out["phases"][f"hf_{stage}"]
        assert v["batch"]["image_tokens"] == 2 * out["phases"]["build"]["image_tokens_per_image"]
        assert v["model_flops_per_step"] > 0 and h["step_time_ratio_vlkit_over_hf"] > 0
        assert h["trainable_params"] == h["vlkit_trainable_params"]
    assert out["phases"]["hf_align"]["loss_step1_rel_diff"] < 1e-4
