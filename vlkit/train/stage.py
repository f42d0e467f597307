"""One stage of training, as a recipe that reads top to bottom (:func:`run_stage`):

    what trains -> data (checks, feature cache) -> resume point -> pre-flight -> optimizer under the job's strategy
    -> its resumed state -> steps (log, checkpoint, evaluate every N) -> final checkpoint -> evaluate

Every stage (align, instruct, ...) runs this same loop; a stage's settings come from the recipe.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vlkit.checkpoint import find_checkpoint, load_checkpoint
from vlkit.config import Recipe, StageConfig
from vlkit.data.collate import Collator, epoch_batches, padding_fraction
from vlkit.data.llava import ImageTransform
from vlkit.distributed import DistContext, StageEngine, check_same_modules, make_engine
from vlkit.model import VLM, parameter_counts
from vlkit.random_init import progress_label
from vlkit.train.data import (BadImages, MicroBatchStream, Position, StageData, TrainingError, load_stage_data,
                                  micro_batch_size, preflight, prepare_features, stage_steps)
from vlkit.train.evaluation import eval_row, run_eval
from vlkit.train.metrics_log import MetricsLog
from vlkit.train.setup import autocast_dtype, build_optimizer, lr_schedule, pin_threads, set_trainable


@dataclass
class StageResult:
    """How :func:`run_stage` ended: ``finished`` (``metrics`` is the stage's summary.json entry), ``dry_run`` (one
    step done) or ``stopped`` (``stop_after`` reached)."""

    status: Literal["finished", "dry_run", "stopped"]
    step: int
    loss: float  # the last step's loss
    metrics: dict[str, Any] = field(default_factory=dict)
    step_time_s: float | None = None  # dry_run: the step's time
    sharded: bool = False  # finished under FSDP / ZeRO-3: the weights are split, train() evaluates an unsharded copy


@dataclass
class StageRun:
    """What one stage's steps read and advance, built in order by :func:`run_stage`."""

    name: str
    stage: StageConfig
    recipe: Recipe
    model: VLM
    ctx: DistContext
    device: torch.device
    console: Console
    log: MetricsLog
    data: StageData
    transform: ImageTransform
    features_fn: Any
    ckpt_dir: Path
    total_steps: int
    position: Position
    bad_images: BadImages
    stream: MicroBatchStream
    amp: torch.dtype | None
    engine: StageEngine | None = None
    scheduler: Any = None
    tokens_seen: int = 0
    last_loss: float = float("nan")


@dataclass
class ResumePoint:
    """A stage's last checkpoint (``found`` None: the stage starts at step 0), its state and the position in it."""

    found: Path | None
    state: dict[str, Any]
    position: Position


# ---- the recipe ------------------------------------------------------------------------------------------------
def run_stage(model: VLM, recipe: Recipe, stage_name: str, run_dir: Path, device: torch.device, console: Console,
              log: MetricsLog, dry_run: bool = False, features_fn: Any = None,
              stop_after: int | None = None, ctx: DistContext | None = None) -> StageResult:
    """Train one stage of ``recipe`` on ``model`` (resuming from its last checkpoint in ``run_dir``), save its final
    weights and evaluate it; ``dry_run`` stops after one step, ``stop_after`` after that step."""
    ctx = ctx or DistContext(device=device)  # the process's place in a distributed job (default: alone)
    stage = recipe.stages[stage_name]
    set_trainable(model, stage)
    data, transform, features_fn, phases = prepare_data(model, recipe, stage_name, ctx, console, features_fn)
    micro = micro_batch_size(stage)
    warn_idle_ranks(ctx, micro, console)
    ckpt_dir = run_dir / "checkpoints" / stage_name
    resume = resume_point(ckpt_dir, model, recipe, stage_name, console)
    log.truncate_after(stage_name, resume.position.step)  # also from step 0: rows of a run killed before its checkpoint
    total_steps = stage_steps(stage, len(data.train))
    trainable, pad_frac = announce(model, recipe, stage_name, data, micro, total_steps, ctx, console)
    run = StageRun(stage_name, stage, recipe, model, ctx, device, console, log, data, transform, features_fn,
                   ckpt_dir, total_steps, resume.position, bad_images_at(recipe, ckpt_dir, resume.state),
                   MicroBatchStream(data, recipe, micro, ctx, Collator(model.tokenizer.pad_token_id), resume.position),
                   autocast_dtype(recipe.train.precision, device))
    model.train()
    try:
        first = None
        if resume.found is None:  # before wrapping: ZeRO-3 / FSDP shard the weights these checks read
            first = run.stream.take(stage.grad_accum, device)
            preflight(model, first[0], console, model.tokenizer, run.features_fn)
        run.engine, run.scheduler = build_optimizer_under_strategy(run, micro)
        resume_optimizer(run, resume)
        t_start = time.time()
        ended = run_steps(run, first, t_start, dry_run, stop_after)
    finally:
        run.stream.close()  # the data loader's processes end with the steps (they hold the run directory's lock)
    if ended is not None:
        return ended
    metrics = stage_metrics(run, trainable, pad_frac, {**phases, "train_s": time.time() - t_start})
    save_final(run)
    return evaluate_at_end(run, metrics)


# ---- before the first step -------------------------------------------------------------------------------------
def prepare_data(model: VLM, recipe: Recipe, stage_name: str, ctx: DistContext, console: Console,
                 features_fn: Any) -> tuple[StageData, ImageTransform, Any, dict[str, float]]:
    """The stage's data read and checked, the feature cache filled for it; and where that time went."""
    transform = ImageTransform(model.encoder.image_size, model.encoder.mean, model.encoder.std)
    t_phase = time.time()
    data = load_stage_data(recipe, stage_name, model, transform, console)
    phases = {"checks_s": time.time() - t_phase}  # where the stage's time goes (a study's report sums them)
    features_fn = prepare_features(features_fn, data, recipe, stage_name, transform, ctx, console)
    phases["cache_s"] = time.time() - t_phase - phases["checks_s"]
    return data, transform, features_fn, phases


def warn_idle_ranks(ctx: DistContext, micro: int, console: Console) -> None:
    if ctx.world_size > micro:
        console.print(f"[yellow]{ctx.world_size} processes but micro-batches of {micro}: some ranks idle (weight 0) "
                      "on every micro-batch; raise batch_size or lower grad_accum[/]")


def resume_point(ckpt_dir: Path, model: VLM, recipe: Recipe, stage_name: str, console: Console) -> ResumePoint:
    """The stage's last checkpoint, if any: its weights and RNG states are loaded now, the optimizer's state once
    the stage's engine exists (:func:`resume_optimizer`)."""
    found = find_checkpoint(ckpt_dir / "last")
    if found is None:
        return ResumePoint(None, {}, Position())
    state = load_checkpoint(found, model, None)
    position = Position(state["step"], state["epoch"], state["batch_pos"])
    console.print(f"resuming stage '{stage_name}' at step {position.step} (epoch {position.epoch}, "
                  f"batch {position.batch_pos})")
    pin_threads(state, recipe.train.deterministic, console)
    return ResumePoint(found, state, position)


def bad_images_at(recipe: Recipe, ckpt_dir: Path, state: dict[str, Any]) -> BadImages:
    """The stage's count of images that failed mid-run, as its checkpoint recorded it."""
    return BadImages(recipe.data.skip_bad, ckpt_dir, state.get("skipped_images", 0),
                     list(state.get("skipped_image_records", [])))


def announce(model: VLM, recipe: Recipe, stage_name: str, data: StageData, micro: int, total_steps: int,
             ctx: DistContext, console: Console) -> tuple[int, float]:
    """Print the stage's line (samples, steps, batch, trainable parameters, padding); return the last two."""
    stage = recipe.stages[stage_name]
    trainable = sum(c["trainable"] for c in parameter_counts(model).values())
    all_batches = epoch_batches(data.lengths, data.has_image, micro, recipe.train.seed, 0, recipe.data.group_by_length)
    pad_frac = padding_fraction(data.lengths, all_batches)
    console.print(f"[bold]stage {stage_name}[/]: {len(data.train)} samples, {total_steps} steps x {stage.batch_size} "
                  f"(micro {micro} x accum {stage.grad_accum}), trainable {trainable:,} params, "
                  f"padding {pad_frac:.1%}, llm={stage.llm}"
                  + (f", {ctx.mode} over {ctx.world_size} processes" if ctx.active else ""))
    if model.cells_note:
        console.print(f"[yellow]{model.cells_note}[/]")
    return trainable, pad_frac


def build_optimizer_under_strategy(run: StageRun, micro: int) -> tuple[StageEngine, Any]:
    """The stage's model + optimizer under the job's strategy (none, ddp, deepspeed, fsdp: vlkit/distributed/), and
    its learning-rate schedule (:func:`lr_schedule`)."""
    check_same_modules(run.ctx, run.data.has_image, run.recipe.data.group_by_length)
    engine = make_engine(run.ctx, run.model, functools.partial(build_optimizer, run.model, run.stage), run.stage,
                         micro, run.ckpt_dir, find_unused=not all(run.data.has_image))
    scheduler = lr_schedule(engine.optimizer, run.stage, run.total_steps)
    return engine, scheduler


def resume_optimizer(run: StageRun, resume: ResumePoint) -> None:
    if resume.found is not None:
        run.engine.load_optimizer(resume.found, resume.state, lambda msg: run.console.print(f"[yellow]{msg}[/]"))
        run.scheduler.load_state_dict(resume.state["scheduler"])


# ---- the steps -------------------------------------------------------------------------------------------------
def run_steps(run: StageRun, first: list[dict[str, Any]] | None, t_start: float, dry_run: bool,
              stop_after: int | None) -> StageResult | None:
    """Optimizer steps until the stage's last; a StageResult when a dry run or ``stop_after`` ends it early."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f} lr {task.fields[lr]:.2e} {task.fields[tps]:.0f} tok/s"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    pos = run.position
    with Progress(*columns, console=run.console, transient=False,
                  disable=not run.console.is_terminal and dry_run) as progress:
        task = progress.add_task(progress_label(run.model, run.name), total=run.total_steps, completed=pos.step, loss=float("nan"), lr=0.0,
                                 tps=0.0)
        while pos.step < run.total_steps:
            run.engine.zero_grad()
            parts = first or run.stream.take(run.stage.grad_accum, run.device)
            first = None
            row, dt = train_step(run, parts)
            show_progress(run, progress, task, row, t_start)
            if dry_run:
                run.console.print(f"dry run: one step done, loss {row['loss']:.4f}")
                run.engine.close()
                return StageResult("dry_run", pos.step, row["loss"], step_time_s=dt)
            if pos.step % run.stage.save_every == 0 or pos.step == run.total_steps:
                save_last(run)
            if stop_after is not None and pos.step >= stop_after:
                run.engine.close()
                return StageResult("stopped", pos.step, row["loss"])
            evaluate_mid_stage(run)
    return None


def train_step(run: StageRun, parts: list[dict[str, Any]]) -> tuple[dict[str, Any], float]:
    """One optimizer step over one global batch (its micro-batches); logs it; returns its metrics.jsonl row and
    its time."""
    n_total = sum(int((p["labels"][:, 1:] != -100).sum()) for p in parts if not p["dummy"])
    bad = [b for p in parts for b in p["bad"]]
    n_bad = len(bad)
    if run.ctx.active:  # token-weighted over the global batch: every rank divides by the same count
        n_total, n_bad = (int(v) for v in run.ctx.all_sum(n_total, n_bad))
    run.bad_images.take(bad, n_bad, run.console)  # stops here (before the step) unless data.skip_bad
    t0 = time.time()
    loss_sum, step_tokens = accumulate(run, parts, n_total)
    run.tokens_seen += int(step_tokens)
    loss = loss_sum / max(n_total, 1)
    if not math.isfinite(loss):
        raise TrainingError(f"stage '{run.name}' step {run.position.step + 1}: loss is {loss}; stopped. The last "
                            f"good checkpoint is kept in {run.ckpt_dir / 'last'}")
    grad_norm = run.engine.step(run.stage.max_grad_norm)  # clip (if set) and step
    run.scheduler.step()
    run.position.step += 1
    run.last_loss = loss
    dt = time.time() - t0
    row = {"stage": run.name, "step": run.position.step, "loss": loss, "lr": run.engine.optimizer.param_groups[0]["lr"],
           "grad_norm": grad_norm, "tokens_per_s": step_tokens / max(dt, 1e-9), "supervised_tokens": n_total,
           "epoch": run.position.epoch}
    if run.bad_images.count:
        row["skipped_images"] = run.bad_images.count  # so far in this stage (data.skip_bad)
    run.log.write(row)
    return row, dt


def accumulate(run: StageRun, parts: list[dict[str, Any]], n_total: int) -> tuple[float, int]:
    """Forward and backward over the step's micro-batches; the summed loss and tokens (over all ranks)."""
    engine, device, amp = run.engine, run.device, run.amp
    loss_sum, step_tokens = 0.0, 0
    for k, batch in enumerate(parts):
        feats = run.features_fn(batch) if run.features_fn else None
        with engine.sync(last=k == len(parts) - 1):  # gradients are reduced after the last micro-batch
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = engine.forward(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                     pixel_values=None if feats is not None else batch["pixel_values"],
                                     features=feats, image_index=batch["image_index"])
            part = out.loss_sum / max(n_total, 1)  # token-weighted over the accumulated micro-batches
            if batch["dummy"]:
                part = part * 0.0
            elif engine.grad_scale != 1.0:
                part = part * engine.grad_scale  # the strategies average gradients over ranks
            engine.backward(part)
        if not batch["dummy"]:
            loss_sum += float(out.loss_sum.detach())
            step_tokens += int(batch["attention_mask"].sum())
    if run.ctx.active:
        loss_sum, step_tokens = run.ctx.all_sum(loss_sum, step_tokens)
    return loss_sum, step_tokens


def show_progress(run: StageRun, progress: Progress, task: Any, row: dict[str, Any], t_start: float) -> None:
    """The live bar; in logs and CI (no live bar), a plain line every 5% of the stage."""
    step, total = run.position.step, run.total_steps
    loss, lr, tps = row["loss"], row["lr"], row["tokens_per_s"]
    progress.update(task, completed=step, loss=loss, lr=lr, tps=tps)
    if not run.console.is_terminal and (step % max(1, total // 20) == 0 or step == total):
        run.console.print(f"{run.name} step {step}/{total} loss {loss:.4f} lr {lr:.2e} {tps:.0f} tok/s "
                          f"elapsed {time.time() - t_start:.0f} s")


def save_last(run: StageRun) -> None:
    """The resumable checkpoint: weights, optimizer, schedule, RNG, data position, thread count."""
    pos = run.position
    run.engine.save(run.ckpt_dir / "last",
                    {"stage": run.name, "step": pos.step, "epoch": pos.epoch, "batch_pos": pos.batch_pos,
                     "scheduler": run.scheduler.state_dict(), "recipe_identity": run.recipe.identity(),
                     "skipped_images": run.bad_images.count, "skipped_image_records": run.bad_images.records,
                     "threads": torch.get_num_threads()})


def evaluate_mid_stage(run: StageRun) -> None:
    """``eval_every``: rank 0 evaluates, the others wait (skipped while FSDP / ZeRO-3 shard the weights)."""
    step, stage = run.position.step, run.stage
    if not (stage.eval_every and step % stage.eval_every == 0 and step < run.total_steps and run.data.eval_records):
        return
    if not run.ctx.shards_weights:
        m = run.ctx.on_main(functools.partial(run_eval, run.model, run.recipe, stage, run.data.eval_records,
                                              run.transform, run.device, run.features_fn), {})
        run.log.write({"stage": run.name, "step": step, **eval_row(m)})
    elif step == stage.eval_every:
        run.console.print(f"[yellow]eval_every: skipped while {run.ctx.mode} shards the weights; the stage is "
                          "evaluated when it ends[/]")


# ---- after the last step ---------------------------------------------------------------------------------------
def stage_metrics(run: StageRun, trainable: int, pad_frac: float, time_s: dict[str, float]) -> dict[str, Any]:
    """The stage's summary.json entry before its evaluation (``train_s`` includes eval_every evaluations)."""
    wall = time_s["train_s"]
    return {"steps": run.position.step, "final_loss": run.last_loss, "wall_time_s": wall,
            "tokens_per_s": run.tokens_seen / max(wall, 1e-9), "padding_fraction": pad_frac,
            "trainable_params": trainable, "skipped_records": run.data.skipped,
            "skipped_images": run.bad_images.count, "skipped_image_records": run.bad_images.records,
            "num_image_tokens": run.model.num_image_tokens, "threads": torch.get_num_threads(), "time_s": time_s}


def save_final(run: StageRun) -> None:
    """The stage's trained weights (no optimizer): the next stage starts from them."""
    run.engine.save(run.ckpt_dir / "final", {"stage": run.name, "step": run.position.step, "epoch": 0,
                                             "batch_pos": 0, "recipe_identity": run.recipe.identity(),
                                             "threads": torch.get_num_threads()},
                    with_optimizer=False)
    run.engine.close()


def evaluate_at_end(run: StageRun, metrics: dict[str, Any]) -> StageResult:
    """The end-of-stage evaluation on rank 0 (FSDP / ZeRO-3: left to train(), on an unsharded copy)."""
    if run.ctx.shards_weights:
        return StageResult("finished", run.position.step, run.last_loss, metrics, sharded=True)
    if run.data.eval_records:
        t_eval = time.time()
        m = run.ctx.on_main(functools.partial(run_eval, run.model, run.recipe, run.stage, run.data.eval_records,
                                              run.transform, run.device, run.features_fn), {})
        run.log.write({"stage": run.name, "step": run.position.step, **eval_row(m)})
        metrics.update(m)
        metrics["time_s"]["eval_s"] = time.time() - t_eval
    return StageResult("finished", run.position.step, run.last_loss, metrics)
