"""Execute a planned grid: every run is an ordinary ``vlkit train`` run directory under the ablation directory.

Finished runs are skipped on a rerun; failed or incomplete ones run again (resuming from their checkpoints). A
failed run is recorded with its error and never stops the others. A run being trained holds its directory's lock
(vlkit/_locks.py) for as long as its process lives, so a second grid on the same directory (a rerun while the first
one's jobs still run, or a colleague on a shared file system) leaves it alone and shows it as running elsewhere. Executors: ``local`` (a pool of worker
processes on this machine) and ``slurm`` (submitit; ``cluster=local`` runs the same path on this machine).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.live import Live
from rich.table import Table

from vlkit._atomic import write_json_atomic
from vlkit._locks import INHERITED_ENV, release_run, run_holder, run_is_live, try_lock_run
from vlkit.ablate.grid import RunSpec


def run_status(run_dir: Path) -> str:
    """running / finished / failed / incomplete / pending, from the run directory alone.

    running: a live process holds the directory's lock (here or on another machine sharing the file system).
    An unreadable ``summary.json`` or ``status.json`` (cut short by a kill while an older vlkit wrote it in place)
    counts as incomplete: the point runs again, resumes from its checkpoints and rewrites both."""
    if run_is_live(run_dir):
        return "running"
    if _read_status(run_dir / "summary.json") == "finished":
        return "finished"
    if _read_status(run_dir / "status.json") == "failed":
        return "failed"
    return "incomplete" if run_dir.exists() else "pending"


def _read_status(path: Path) -> str | None:
    """The ``status`` field of a JSON state file; None when the file is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get("status") if isinstance(data, dict) else None


def train_command(recipe: str, spec: RunSpec, run_dir: Path, feature_cache: bool) -> list[str]:
    cmd = [sys.executable, "-m", "vlkit.cli", "train", recipe, *spec.overrides, "--run-dir", str(run_dir)]
    return cmd + (["--feature-cache"] if feature_cache else ["--no-feature-cache"])


def execute_run(recipe: str, spec: dict[str, Any], run_dir: str, feature_cache: bool = True,
                threads: int | None = None) -> dict[str, Any]:
    """Run one grid point as ``vlkit train`` in a child process; record failure in ``status.json``.

    A plain function of plain arguments so that every executor (thread pool, submitit) can ship it.
    """
    spec_obj = RunSpec(**spec)
    rd = Path(run_dir)
    lock = try_lock_run(rd)
    if lock is None:  # planned by two grids at once: the other one got it first
        return {"status": "elsewhere", "holder": run_holder(rd)}
    try:
        if _read_status(rd / "summary.json") == "finished":
            # planned by two grids at once: the other one trained it between this grid's plan and now; a second
            # `vlkit train` would rewrite its state files (summary, status, log) although nothing is left to train
            return {"status": "finished"}
        return _execute_locked(recipe, spec_obj, rd, feature_cache, threads, lock)
    finally:
        release_run(lock)


def _execute_locked(recipe: str, spec: RunSpec, rd: Path, feature_cache: bool, threads: int | None,
                    lock: int) -> dict[str, Any]:
    """execute_run holding the directory's lock; the `vlkit train` child inherits it (lives as long as either)."""
    write_json_atomic(rd / "status.json", {"status": "running", "started": time.time(), "host": os.uname().nodename})
    env = dict(os.environ)
    if threads:
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    env["COLUMNS"] = "160"
    env[INHERITED_ENV] = str(rd.resolve())
    t0 = time.time()
    with open(rd / "train.log", "a") as log:
        proc = subprocess.run(train_command(recipe, spec, rd, feature_cache), stdout=log, stderr=subprocess.STDOUT,
                              env=env, pass_fds=(lock,))
    status: dict[str, Any] = {"status": "finished" if proc.returncode == 0 else "failed",
                              "returncode": proc.returncode, "wall_time_s": time.time() - t0}
    if proc.returncode != 0:
        tail = (rd / "train.log").read_text().splitlines()[-15:]
        status["error"] = "\n".join(tail)
    write_json_atomic(rd / "status.json", status)
    return status


@dataclass
class GridProgress:
    """One live table of the grid: done / running / failed with an ETA."""

    specs: list[RunSpec]
    states: dict[str, str]
    started: float

    def table(self) -> Table:
        counts = {s: list(self.states.values()).count(s) for s in ("finished", "running", "failed", "pending",
                                                                   "skipped", "queued", "elsewhere")}
        done = counts["finished"] + counts["failed"]
        todo = done + counts["running"] + counts["queued"]
        elapsed = time.time() - self.started
        eta = f"{elapsed / done * (todo - done):.0f} s" if done else "?"
        t = Table(title=f"grid: {counts['finished']} finished, {counts['running']} running, {counts['queued']} queued, "
                        f"{counts['failed']} failed, {counts['skipped']} skipped"
                        + (f", {counts['elsewhere']} running in another process" if counts["elsewhere"] else "")
                        + f"; ETA {eta}")
        t.add_column("run")
        t.add_column("state")
        style = {"finished": "green", "failed": "red", "running": "yellow", "skipped": "dim", "elsewhere": "yellow"}
        for s in self.specs:
            st = self.states[s.id]
            shown = "running (another process)" if st == "elsewhere" else st
            t.add_row(s.id, f"[{style.get(st, '')}]{shown}[/]" if style.get(st) else shown)
        return t


def default_workers(n_runs: int) -> int:
    """Runs are CPU-bound small models: one single-threaded worker per core beats fewer multi-threaded ones on
    these machines (OpenMP threads spin-wait when a core is shared), bounded by memory (~3 GiB per toy run)."""
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    return max(1, min(n_runs, cores, int(mem_gb // 3)))


def run_grid(recipe: str, specs: list[RunSpec], out: Path, executor: str = "local", workers: int | None = None,
             feature_cache: bool = True, console: Console | None = None,
             slurm: dict[str, Any] | None = None) -> dict[str, str]:
    """Run every pending/failed/incomplete point; returns run id -> final state.

    A point whose directory a live process holds (another grid, a `vlkit train`) is left to it: "elsewhere"."""
    console = console or Console()
    runs_dir = out / "runs"
    states, todo = _pending(specs, runs_dir, console)
    if not todo:
        return states
    workers = workers or default_workers(len(todo))
    threads = max(1, (os.cpu_count() or 1) // workers)
    progress = GridProgress(specs, states, time.time())
    submit, pool = _submitter(executor, recipe, out, feature_cache, threads, workers, states, slurm)
    console.print(f"running {len(todo)} run(s) with the {executor} executor, {workers} at a time"
                  + (f", {threads} thread(s) each" if executor == "local" else ""))
    with Live(progress.table(), console=console, refresh_per_second=2, transient=False) as live:
        futures = {submit(s): s for s in todo}
        for fut in _as_done(futures, live, progress, states):
            s = futures[fut]
            try:
                states[s.id] = fut.result()["status"]
            except Exception as exc:  # an executor-level failure of one run is recorded, the grid goes on
                states[s.id] = "failed"
                (runs_dir / s.id).mkdir(parents=True, exist_ok=True)
                write_json_atomic(runs_dir / s.id / "status.json", {"status": "failed", "error": repr(exc)})
            live.update(progress.table())
    if executor == "local":
        pool.shutdown()
    return states


def _pending(specs: list[RunSpec], runs_dir: Path, console: Console) -> tuple[dict[str, str], list[RunSpec]]:
    """Each point's state before the grid runs, and the points to run (queued)."""
    states: dict[str, str] = {}
    todo: list[RunSpec] = []
    for s in specs:
        status = "skipped" if s.skipped else run_status(runs_dir / s.id)
        if status in ("skipped", "finished"):
            states[s.id] = status
        elif status == "running":
            states[s.id] = "elsewhere"
        else:
            states[s.id] = "queued"
            todo.append(s)
    elsewhere = [s.id for s in specs if states[s.id] == "elsewhere"]
    if elsewhere:
        console.print(f"{len(elsewhere)} run(s) are being trained by another process, left to it: "
                      + ", ".join(f"{i} ({run_holder(runs_dir / i)})" for i in elsewhere))
    if not todo:
        console.print("every run of the grid is finished" if not elsewhere else "nothing else to run")
    return states, todo


def _submitter(executor: str, recipe: str, out: Path, feature_cache: bool, threads: int, workers: int,
               states: dict[str, str], slurm: dict[str, Any] | None) -> tuple[Callable[[RunSpec], Any], Any]:
    """``submit(spec) -> future`` for the executor, and its pool (threads that wait on child processes, or
    submitit's executor)."""
    runs_dir = out / "runs"
    if executor == "local":
        pool = ThreadPoolExecutor(max_workers=workers)
        return functools.partial(_submit_local, pool, states, recipe, runs_dir, feature_cache, threads), pool
    if executor in ("slurm", "submitit-local"):
        from vlkit.ablate.cluster import submitit_submitter

        submit_job, pool = submitit_submitter(out, executor, slurm or {})
        return functools.partial(_submit_job, submit_job, recipe, runs_dir, feature_cache, threads), pool
    raise ValueError(f"unknown executor '{executor}'; valid: local, slurm, submitit-local")


def _submit_local(pool: ThreadPoolExecutor, states: dict[str, str], recipe: str, runs_dir: Path, feature_cache: bool,
                  threads: int, s: RunSpec) -> Any:
    return pool.submit(_local_run, states, recipe, runs_dir, feature_cache, threads, s)


def _local_run(states: dict[str, str], recipe: str, runs_dir: Path, feature_cache: bool, threads: int,
               s: RunSpec) -> dict[str, Any]:
    states[s.id] = "running"
    return execute_run(recipe, s.to_dict(), str(runs_dir / s.id), feature_cache, threads)


def _submit_job(submit_job: Callable[..., Any], recipe: str, runs_dir: Path, feature_cache: bool, threads: int,
                s: RunSpec) -> Any:
    return submit_job(execute_run, recipe, s.to_dict(), str(runs_dir / s.id), feature_cache, threads)


def _as_done(futures, live, progress, states):
    """Yield futures as they finish, refreshing the grid view; a submitit job shows as running once it starts."""
    pending = set(futures)
    while pending:
        for fut in list(pending):
            if fut.done():
                pending.discard(fut)
                yield fut
            elif states[futures[fut].id] == "queued" and getattr(fut, "state", None) in ("RUNNING", "COMPLETING"):
                states[futures[fut].id] = "running"
        live.update(progress.table())
        time.sleep(1)
