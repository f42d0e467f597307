"""State files a later process reads back: written atomically, and a damaged one found on resume is rebuilt from
what it summarises (or named, with what to do)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from rich.console import Console

from helpers import FAST, losses, vlkit
from vlkit import _atomic
from vlkit._atomic import StateError, read_json, write_json_atomic
from vlkit.ablate.results import load_plan
from vlkit.ablate.run import run_status
from vlkit.config import load_recipe
from vlkit.train import MetricsLog, train

WRITER = """
import sys
from vlkit._atomic import write_json_atomic
big = {"stages": {f"s{i}": {"loss": i, "pad": "x" * 2000} for i in range(500)}}  # ~1 MB: kills land mid-write
print("ready", flush=True)
n = 0
while True:
    n += 1
    write_json_atomic(sys.argv[1], {**big, "n": n})
"""


def test_killed_writer_leaves_a_whole_file(tmp_path):
    target = tmp_path / "summary.json"
    write_json_atomic(target, {"n": 0})
    for kill in range(5):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3 + 0.1 * kill)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = json.loads(target.read_text())  # the previous or the next version, never a cut one
        assert data["n"] >= 0, kill


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "status.json"
    write_json_atomic(target, {"status": "running"})

    def killed(*args):
        raise KeyboardInterrupt  # as if the process died between writing the temp file and the rename

    monkeypatch.setattr(_atomic.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(target, {"status": "finished"})
    assert json.loads(target.read_text()) == {"status": "running"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_unreadable_state_files_are_named(tmp_path):
    (tmp_path / "plan.json").write_text('{"recipe": "x", "runs": [')
    with pytest.raises(StateError, match=r"plan\.json is not valid JSON .*Run the same `vlkit ablate` command"):
        load_plan(tmp_path)
    with pytest.raises(StateError, match=r"meta\.json is not valid JSON .*delete it"):
        (tmp_path / "meta.json").write_text("{")
        read_json(tmp_path / "meta.json", "delete it")
    # a grid point whose status.json or summary.json was cut short runs again (and resumes from its checkpoints)
    run = tmp_path / "runs" / "r0"
    run.mkdir(parents=True)
    (run / "status.json").write_text('{"status": "fai')
    assert run_status(run) == "incomplete"
    (run / "summary.json").write_text('{"status": "finished", "stages": {"align"')
    assert run_status(run) == "incomplete"


def test_truncated_summary_of_finished_run_is_rebuilt_on_resume(tiny_toy_world, tmp_path):
    run = tmp_path / "run"
    train(load_recipe("mlp_patch", FAST), run, console=Console(quiet=True))
    before = json.loads((run / "summary.json").read_text())
    metrics = (run / "metrics.jsonl").read_bytes()
    text = (run / "summary.json").read_text()
    (run / "summary.json").write_text(text[:100])  # as a kill during an in-place write left it
    res = vlkit("train", "recipes/mlp_patch.yaml", *FAST, "--run-dir", str(run))
    out = " ".join(res.stdout.split())
    assert "summary.json is not valid JSON" in out and "rebuilt summary.json" in out, out
    after = json.loads((run / "summary.json").read_text())
    assert after["status"] == "finished" and after["stages"] == before["stages"]
    assert "rebuilt" in after and after["wall_time_s"] > 0
    assert (run / "metrics.jsonl").read_bytes() == metrics  # nothing trained or evaluated again
    for stage in ("align", "instruct"):
        final = run / "checkpoints" / stage / "final"
        assert json.loads((final / "metrics.json").read_text()) == before["stages"][stage]


def test_resume_drops_a_torn_metrics_line_and_rows_of_a_run_killed_before_its_checkpoint(tiny_toy_world, tmp_path):
    run = tmp_path / "run"
    args = [*FAST, "train.stages=[align]", "stages.align.eval_data=null"]
    train(load_recipe("mlp_patch", args), run, console=Console(quiet=True), stop_after=("align", 2))
    assert not (run / "checkpoints").exists()  # stopped before the first checkpoint: the next run starts at 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"stage": "align", "step": 3, "lo')  # a kill during the append
    train(load_recipe("mlp_patch", args), run, console=Console(quiet=True))
    assert [(s, st) for s, st, _ in losses(run)] == [("align", 1), ("align", 2), ("align", 3)]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "{cut", *lines[1:]]) + "\n")
    with pytest.raises(StateError, match=r"metrics\.jsonl line 2 is not valid JSON .*Delete or repair that line"):
        MetricsLog(run / "metrics.jsonl").truncate_after("align", 1)  # only a last line can be cut by a kill
