"""``vlkit train``: the run, top to bottom (:func:`train`):

    seed, join the job -> hold and prepare the run directory -> summary so far -> build the model
    -> for each stage in order: load it when finished, else run it (vlkit/train/stage.py) and record it -> finish

Stage ``align`` trains the projector on captions (encoder and LLM frozen); ``instruct`` trains the projector plus
LoRA (or the full LLM) on conversations.
"""
from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from vlkit._atomic import read_json, write_json_atomic
from vlkit._locks import hold_run_dir, release_run
from vlkit._proc import peak_rss_mb
from vlkit.checkpoint import find_checkpoint, load_trainable
from vlkit.config import Recipe
from vlkit.distributed import DistContext
from vlkit.distributed import setup as setup_distributed
from vlkit.model import VLM, build_model, parameter_counts
from vlkit.random_init import random_weight_parts, tag_console
from vlkit.runs import pick_device
from vlkit.toyworld import toy_world_of
from vlkit.train.accuracy import print_accuracy
from vlkit.train.evaluation import eval_row, final_eval, keep_predictions
from vlkit.train.metrics_log import MetricsLog, NullLog
from vlkit.train.setup import pin_threads, seed_everything, set_trainable
from vlkit.train.stage import StageResult, run_stage
from vlkit.train.summary import default_run_dir, load_summary, prepare_run_dir, stage_metrics_path


def train(recipe: Recipe, run_dir: Path | None = None, console: Console | None = None, dry_run: bool = False,
          features: Any = None, stop_after: tuple[str, int] | None = None) -> dict[str, Any]:
    """Run the recipe's stages in order; resumes automatically from the run directory's checkpoints.

    Returns the run's summary; a dry run ``{"dry_run": True, "loss", "step_time_s"}``, and a run ended by
    ``stop_after=(stage, step)`` ``{"stopped_at": step}``.
    Under ``torchrun``/``deepspeed``/``srun`` every process runs this; rank 0 alone writes the run directory.
    The caller's torch thread count is restored afterwards (a resumed stage may pin another, see pin_threads).
    Rank 0 holds the run directory's lock while it trains (vlkit/_locks.py): a second trainer is refused.
    """
    threads = torch.get_num_threads()
    with contextlib.ExitStack() as held:
        try:
            return _train(recipe, run_dir, console or Console(), dry_run, features, stop_after, held)
        finally:
            torch.set_num_threads(threads)


def _train(recipe: Recipe, run_dir: Path | None, console: Console, dry_run: bool, features: Any,
           stop_after: tuple[str, int] | None, held: contextlib.ExitStack) -> dict[str, Any]:
    ctx, run_dir = open_run(recipe, run_dir, console, held)
    summary = load_summary(run_dir, recipe, console)
    summary.update({"recipe": recipe.name, "identity": recipe.identity(), "status": "running"})
    world = toy_world_of(recipe.to_dict())
    if world:  # the toy world's weights and data the run used: $VLKIT_TOY_PRESET picks them, not the recipe
        summary["toy_world"] = world
    log = MetricsLog(run_dir / "metrics.jsonl") if ctx.is_main else NullLog()
    t0 = time.time()
    model = build_model(recipe).to(ctx.device)
    if random_weight_parts(model):  # components built with random_init (asked for, never silent): every line says so
        summary["random_weights"] = random_weight_parts(model)
        tag_console(console, summary["random_weights"], held)
    summary["num_image_tokens"] = model.num_image_tokens
    summary["build_s"] = time.time() - t0  # the model from its weights (encoder, LLM, tokenizer)
    features_fn = features.for_model(model, ctx.device) if features is not None else None
    for i, stage_name in enumerate(recipe.train.stages):
        if load_finished_stage(model, recipe, run_dir, stage_name, summary, console):
            continue
        result = run_stage(model, recipe, stage_name, run_dir, ctx.device, console, log, dry_run, features_fn,
                           stop_after[1] if stop_after and stop_after[0] == stage_name else None, ctx=ctx)
        if result.status != "finished":
            ctx.close()
            return ended_early(result)
        if result.sharded:  # FSDP / ZeRO-3 left the weights sharded: go on with an unsharded copy
            model = rebuild_model(recipe, run_dir, ctx.device, recipe.train.stages[: i + 1])
            features_fn = features.for_model(model, ctx.device) if features is not None else None
            evaluate_unsharded(model, recipe, stage_name, result, ctx, log, features_fn)
        record_stage(run_dir, stage_name, result.metrics, summary, ctx, console)
    finish_run(run_dir, summary, model, ctx, t0)
    return summary


def open_run(recipe: Recipe, run_dir: Path | None, console: Console,
             held: contextlib.ExitStack) -> tuple[DistContext, Path]:
    """Seeds, the process's place in the job, and the run directory (rank 0 holds its lock and writes it)."""
    seed_everything(recipe.train.seed, recipe.train.deterministic)
    ctx = setup_distributed(recipe, pick_device(recipe.train.device), console)
    if not ctx.is_main:
        console.quiet = True  # one voice: rank 0 prints, logs and shows progress (errors still reach stderr)
    if ctx.is_main:
        lock = hold_run_dir(default_run_dir(recipe, run_dir))  # RunBusyError while another process trains it
        if lock is not None:
            held.callback(release_run, lock)
        run_dir = prepare_run_dir(recipe, run_dir)
    else:
        run_dir = default_run_dir(recipe, run_dir)
    ctx.barrier()
    return ctx, run_dir


def load_finished_stage(model: VLM, recipe: Recipe, run_dir: Path, stage_name: str, summary: dict[str, Any],
                        console: Console) -> bool:
    """A stage finished by an earlier process: its trained weights loaded into ``model`` (True); else False."""
    done = find_checkpoint(run_dir / "checkpoints" / stage_name / "final")
    recorded = stage_metrics_path(run_dir, stage_name)
    if done is not None and stage_name not in summary["stages"] and recorded.exists():
        # killed after the stage was recorded beside its checkpoint, before summary.json was rewritten
        summary["stages"][stage_name] = read_json(recorded, f"Delete it to have stage '{stage_name}' evaluated again")
    if done is None or stage_name not in summary["stages"]:
        return False
    set_trainable(model, recipe.stages[stage_name])
    load_trainable(model, done / "trainable.safetensors")
    console.print(f"stage '{stage_name}' already finished: loaded {done}")
    # the next stage starts as it would have in the first process: with that process's thread count
    pin_threads(read_json(done / "state.json", f"Delete {done.parent} to train stage '{stage_name}' again"),
                recipe.train.deterministic, console)
    return True


def ended_early(result: StageResult) -> dict[str, Any]:
    """What train() returns when a dry run or ``stop_after`` ended it."""
    if result.status == "dry_run":
        return {"dry_run": True, "loss": result.loss, "step_time_s": result.step_time_s}
    return {"stopped_at": result.step}


def rebuild_model(recipe: Recipe, run_dir: Path, device: torch.device, stages: list[str]) -> VLM:
    """A fresh model with the finished ``stages``' trained weights (their ``final`` checkpoints), in order.

    RNG-neutral: building draws initial weights, and the next stage's LoRA init must not depend on that."""
    from vlkit.checkpoint import rng_state, set_rng_state

    saved = rng_state()
    model = build_model(recipe).to(device)
    for name in stages:
        set_trainable(model, recipe.stages[name])
        load_trainable(model, run_dir / "checkpoints" / name / "final" / "trainable.safetensors")
    set_rng_state(*saved)
    return model


def evaluate_unsharded(model: VLM, recipe: Recipe, stage_name: str, result: StageResult, ctx: DistContext,
                       log: MetricsLog, features_fn: Any) -> None:
    """The end-of-stage evaluation of a stage FSDP / ZeRO-3 trained, on rank 0's unsharded copy."""
    if recipe.stages[stage_name].eval_data:
        ev = ctx.on_main(functools.partial(final_eval, model, recipe, stage_name, ctx.device, features_fn), {})
        log.write({"stage": stage_name, "step": result.metrics["steps"], **eval_row(ev)})
        result.metrics.update(ev)


def record_stage(run_dir: Path, stage_name: str, metrics: dict[str, Any], summary: dict[str, Any], ctx: DistContext,
                 console: Console) -> None:
    """The stage's entry: beside its final checkpoint first (summary.json can always be rebuilt from these), then in
    summary.json; then its accuracy table."""
    keep_predictions(run_dir, stage_name, metrics, ctx.is_main)  # before the stage counts as recorded
    summary["stages"][stage_name] = {k: v for k, v in metrics.items() if k != "examples"}
    if ctx.is_main:
        write_json_atomic(stage_metrics_path(run_dir, stage_name), summary["stages"][stage_name])
        write_json_atomic(run_dir / "summary.json", summary)
    if "accuracy" in metrics:
        print_accuracy(console, stage_name, metrics)


def finish_run(run_dir: Path, summary: dict[str, Any], model: VLM, ctx: DistContext, t0: float) -> None:
    summary.update({"status": "finished", "wall_time_s": summary.get("wall_time_s", 0) + time.time() - t0,
                    "peak_rss_mb": peak_rss_mb(), "parameters": parameter_counts(model)})
    if ctx.active:
        summary["distributed"] = {"mode": ctx.mode, "world_size": ctx.world_size}
    if ctx.is_main:
        write_json_atomic(run_dir / "summary.json", summary)
    ctx.barrier()
    ctx.close()
