"""Grids on a cluster through submitit: each run becomes one Slurm job running ``vlkit train``.

``submitit-local`` runs the same jobs through submitit's local executor (used by the tests and for trying a
cluster setup on one machine). Results are collected from the run directories exactly as for the local executor.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def submitit_submitter(out: Path, executor: str, slurm: dict[str, Any]) -> tuple[Callable[..., Any], Any]:
    import submitit

    folder = out / "submitit" / "%j"
    if executor == "submitit-local":
        ex = submitit.AutoExecutor(folder=folder, cluster="local")
        ex.update_parameters(timeout_min=int(slurm.get("time_min") or 240), gpus_per_node=0)
    else:
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
        params: dict[str, Any] = {"timeout_min": int(slurm.get("time_min") or 240), "nodes": 1,
                                  "gpus_per_node": int(slurm.get("gpus") or 1), "tasks_per_node": 1,
                                  "cpus_per_task": int(slurm.get("cpus") or 8), "name": f"vlkit-{out.name}"}
        if slurm.get("partition"):
            params["slurm_partition"] = slurm["partition"]
        ex.update_parameters(**params)
    return ex.submit, ex
