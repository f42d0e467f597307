"""A live run holds its directory's lock: a second `vlkit ablate` leaves it alone (and shows it running), a dead
one's lock is gone with it (kill -9) so the point runs again, and `vlkit train` refuses a directory in use."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import vlkit
from vlkit._locks import INHERITED_ENV, RUN_LOCK, RunBusyError, hold_run_dir, release_run, run_holder, run_is_live
from vlkit.ablate.run import execute_run, run_status

QUICK = ["train.stages=[instruct]", "stages.instruct.max_steps=2", "stages.instruct.batch_size=4",
         "stages.instruct.eval_max_samples=4", "stages.instruct.eval_batch_size=4", "data.max_length=224"]
HOLDER = """
import sys, time
from vlkit._locks import try_lock_run
fd = try_lock_run(sys.argv[1])
print("held" if fd is not None else "busy", flush=True)
time.sleep(600)
"""


def hold(run_dir: Path) -> subprocess.Popen:
    """A process holding run_dir's lock, as a `vlkit train` of another grid would."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_keeps_the_directory_and_its_death_frees_it(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "r0"
    holder = hold(run)
    try:
        assert run_is_live(run) and run_status(run) == "running"
        with pytest.raises(RunBusyError, match=rf"{run} is in use by another process \(host .*, pid {holder.pid}\)"):
            hold_run_dir(run)
        spec = {"id": "r0", "overrides": [], "axes": {}, "seed": 0}
        assert execute_run("mlp_patch", spec, str(run), feature_cache=False)["status"] == "elsewhere"
        assert sorted(p.name for p in run.iterdir()) == [".vlkit-run.lock"]  # nothing written by the loser
        monkeypatch.setenv(INHERITED_ENV, str(run.resolve()))
        assert hold_run_dir(run) is None  # a `vlkit train` started by the holder runs under its lock
        monkeypatch.delenv(INHERITED_ENV)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not run_is_live(run) and run_status(run) == "incomplete"
    fd = hold_run_dir(run)
    assert fd is not None and run_is_live(run)
    release_run(fd)
    assert not run_is_live(run)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and "tensorboard" not in p.parts}


def test_second_grid_skips_a_live_run_and_reruns_it_once_dead(tiny_toy_world, tmp_path, monkeypatch):
    monkeypatch.setenv("VLKIT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "abl"
    args = ["ablate", "mlp_patch", *QUICK, "--projector", "linear,mlp", "--seeds", "1", "--out", str(out),
            "--workers", "1"]
    live, other = out / "runs" / "projector-linear_seed-0", out / "runs" / "projector-mlp_seed-0"
    holder = hold(live)
    try:
        assert run_status(live) == "running"
        first = vlkit(*args)
        text = " ".join(first.stdout.split())
        assert "1 run(s) are being trained by another process" in text and "projector-linear_seed-0" in text, text
        assert run_status(other) == "finished"
        assert sorted(p.name for p in live.iterdir()) == [".vlkit-run.lock"]  # not touched: no second trainer
        busy = vlkit("train", "recipes/mlp_patch.yaml", *QUICK, "--run-dir", str(live), check=False)
        assert busy.returncode == 1 and "in use by another process" in " ".join(busy.stderr.split()), busy.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not run_is_live(live) and run_status(live) == "incomplete"  # the lock died with its holder
    before = snapshot(other)
    second = vlkit(*args)
    assert "running 1 run(s)" in second.stdout, second.stdout
    assert run_status(live) == "finished"
    after = snapshot(other)
    assert after.keys() == before.keys() and all(after[k] == before[k] for k in before)  # unchanged byte for byte


def test_a_point_finished_by_another_grid_after_this_one_planned_it_is_left_alone(tmp_path):
    run = tmp_path / "runs" / "r0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text('{"status": "finished"}')
    before = snapshot(run)
    spec = {"id": "r0", "overrides": [], "axes": {}, "seed": 0}
    assert execute_run("mlp_patch", spec, str(run), feature_cache=False)["status"] == "finished"
    after = snapshot(run)
    assert after.pop(RUN_LOCK).split()[1] == str(os.getpid()).encode()  # the lock taken for the check, by this process
    assert after == before  # no second `vlkit train`: no state file rewritten, no log appended
    assert not run_is_live(run)


# ---- two real `vlkit ablate` on one directory ----------------------------------------------------------------------
# Six steps, a checkpoint every two: a point is killed after its third step (a checkpoint behind it) and resumes.
CONCURRENT = ["train.stages=[instruct]", "stages.instruct.max_steps=6", "stages.instruct.save_every=2",
              "stages.instruct.batch_size=4", "stages.instruct.eval_max_samples=4",
              "stages.instruct.eval_batch_size=4", "data.max_length=224"]
STARTED = re.compile(r"^stage instruct: \d+ samples", re.M)  # `vlkit train` printing it: one training of the point


def start_ablate(args: list[str]) -> subprocess.Popen:
    """`vlkit ablate` in its own process group, so that kill -9 takes its `vlkit train` child with it."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "vlkit.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def holder_pid(run_dir: Path) -> int | None:
    """The pid that took run_dir's lock last (a grid worker's process), while it holds it."""
    pid = run_holder(run_dir).rsplit(" ", 1)[-1]  # "host H, pid P"; "holder unknown" while it is being written
    return int(pid) if pid.isdigit() and run_is_live(run_dir) else None


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count('"loss"') if path.exists() else 0


@pytest.mark.slow  # two trainers at once, then a resumed one: 431 s on a loaded 2-core machine
def test_two_real_grids_share_a_directory_and_a_killed_point_reruns_once(tiny_toy_world, tmp_path):
    out = tmp_path / "abl"
    args = ["ablate", "mlp_patch", *CONCURRENT, "--projector", "linear,mlp", "--seeds", "1", "--out", str(out),
            "--workers", "1", "--no-feature-cache"]
    # Both grids take the points in this order, so the one that gets the first point holds it while the other
    # trains the second; the first point's holder is killed: the other grid has passed that point already (it was
    # running then) and leaves it to a later grid, which resumes it.
    victim, other = out / "runs" / "projector-linear_seed-0", out / "runs" / "projector-mlp_seed-0"
    grids = {p.pid: p for p in (start_ablate(args), start_ablate(args))}  # both at once, on the same directory
    try:
        deadline = time.time() + 1800  # generous: a loaded 2-core machine takes minutes to start the trainers
        while (pid := holder_pid(victim)) not in grids or steps_logged(victim) < 3:  # half way, a checkpoint behind
            assert time.time() < deadline, "the first point did not reach its third step"
            assert all(g.poll() is None for g in grids.values()), "a grid ended before the first point was half done"
            time.sleep(0.05)
        os.killpg(pid, signal.SIGKILL)  # kill -9 the grid and its `vlkit train` child
        grids.pop(pid).wait()
        (survivor,) = grids.values()
        text = survivor.communicate(timeout=900)[0]
        assert survivor.returncode == 0, text
    finally:
        for g in grids.values():
            if g.poll() is None:
                os.killpg(g.pid, signal.SIGKILL)
                g.wait()
    assert "another process" in " ".join(text.split()), text  # the survivor saw the first point held
    assert run_status(victim) == "incomplete", run_status(victim)  # its lock died with it
    assert run_status(other) == "finished"
    assert len(STARTED.findall((other / "train.log").read_text())) == 1  # trained once, by the survivor
    before = snapshot(other)

    rerun = vlkit(*args)
    assert "running 1 run(s)" in rerun.stdout, rerun.stdout
    assert run_status(victim) == "finished"
    log = (victim / "train.log").read_text()
    assert len(STARTED.findall(log)) == 2, log  # the killed training and its one rerun
    assert "resuming stage 'instruct' at step" in log, log  # from the checkpoint the killed run left
    assert snapshot(other) == before  # the finished point is unchanged byte for byte (no second training)
