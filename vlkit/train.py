"""``vlkit train``: the LLaVA recipe, top to bottom.

    build model -> for each stage (align, instruct, ...):
        set what trains -> load + check data -> optimizer/schedule -> pre-flight -> one shared loop -> evaluate

Stage ``align`` trains the projector on captions (encoder and LLM frozen); ``instruct`` trains the projector plus
LoRA (or the full LLM) on conversations. Every stage uses the same loop; a stage's settings come from the recipe.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vlkit._atomic import StateError, read_json, write_json_atomic, write_text_atomic
from vlkit._locks import hold_run_dir, release_run
from vlkit._proc import peak_rss_mb
from vlkit.checkpoint import find_checkpoint, load_checkpoint, load_trainable
from vlkit.config import Recipe, StageConfig, dump_recipe
from vlkit.data.collate import Collator, epoch_batches, padding_fraction
from vlkit.data.llava import DataError, ImageTransform, LlavaDataset, check_records, load_records
from vlkit.data.tokenized import TokenizedCache
from vlkit.data.tokenized import default_dir as tokenized_dir
from vlkit.distributed import DistContext, check_same_modules, make_engine, shard_batch
from vlkit.distributed import setup as setup_distributed
from vlkit.evaluate import evaluate, move
from vlkit.model import VLM, _resolve, build_model, parameter_counts
from vlkit.random_init import progress_label, random_weight_parts, tag_console
from vlkit.runs import attach_lora, pick_device


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, failed pre-flight check)."""


# ---- small shared helpers (used by every stage) ------------------------------------------------------------------
def seed_everything(seed: int, deterministic: bool) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def pin_threads(state: dict[str, Any], deterministic: bool, console: Console) -> None:
    """Resume with the intra-op thread count the checkpointed steps ran with (``train.deterministic``).

    Large matmuls and reductions split their sums over threads, so another count changes results in the last bits
    (measured on this CPU: a [64 x 20000] @ [20000 x 64] matmul and a 1e7-element sum differ between 1 and 2
    threads). A process's count comes from its cores and ``OMP_NUM_THREADS``, which differ when a run resumes on
    another machine or in a grid rerun (``vlkit ablate`` gives each run cores / workers threads)."""
    recorded = state.get("threads")
    if not deterministic or recorded is None or recorded == torch.get_num_threads():
        return
    console.print(f"[yellow]using {recorded} torch threads as the checkpointed steps did (this process had "
                  f"{torch.get_num_threads()}): bit-exact resume under train.deterministic=true[/]")
    torch.set_num_threads(int(recorded))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision only on GPUs: bf16/fp16 matmuls on CPUs are far slower than fp32."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def set_trainable(model: VLM, stage: StageConfig) -> None:
    """Freeze everything, then unfreeze what this stage trains (LoRA is attached on first use)."""
    model.requires_grad_(False)
    if stage.train_projector:  # the connector: projector and any fusion layers
        model.projector.requires_grad_(True)
        model.fusion.requires_grad_(True)
    if stage.llm == "lora":
        attach_lora(model, stage)
        for n, p in model.llm.model.named_parameters():
            p.requires_grad_("lora_" in n)
    elif stage.llm == "full":
        model.llm.requires_grad_(True)
    if stage.unfreeze_encoder_blocks:
        blocks = model.encoder.blocks() if hasattr(model.encoder, "blocks") else []
        if len(blocks) < stage.unfreeze_encoder_blocks:
            raise ValueError(f"unfreeze_encoder_blocks={stage.unfreeze_encoder_blocks} but the encoder exposes "
                             f"{len(blocks)} blocks")
        model.encoder.frozen = False
        for block in blocks[-stage.unfreeze_encoder_blocks:]:
            block.requires_grad_(True)
    if stage.gradient_checkpointing:
        model.llm.base().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def param_groups(model: VLM, stage: StageConfig) -> list[dict[str, Any]]:
    """Per-module learning rates: projector ``lr``, LLM ``lr_llm``, encoder ``lr_encoder`` (default ``lr``)."""
    groups = []
    for part, lr in (("projector", stage.lr), ("fusion", stage.lr), ("llm", stage.lr_llm or stage.lr), ("encoder", stage.lr_encoder or stage.lr)):
        params = [p for p in getattr(model, part).parameters() if p.requires_grad]
        if params:
            decay = [p for p in params if p.dim() >= 2]
            no_decay = [p for p in params if p.dim() < 2]
            groups.append({"name": part, "params": decay, "lr": lr, "weight_decay": stage.weight_decay})
            if no_decay:
                groups.append({"name": f"{part}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
    if not groups:
        raise ValueError("this stage trains nothing: set train_projector, llm: lora|full or unfreeze_encoder_blocks")
    return groups


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, warmup, max(total, 1))


class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl``; each line is flushed so a killed run keeps its log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:  # TensorBoard is optional
            self.tb = None

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None and "step" in row:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{row.get('stage', '')}/{k}", v, row["step"])

    def truncate_after(self, stage: str, step: int) -> None:
        """Drop lines logged after the checkpoint we resume from (they will be written again), and a last line
        cut short by a kill during its append (it was logged after that checkpoint)."""
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        keep = []
        for n, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                if n == len(lines):
                    continue
                raise StateError(f"{self.path} line {n} is not valid JSON ({exc}); only the last line can be cut "
                                 "short by a kill. Delete or repair that line and run again") from None
            if row.get("stage") == stage and row.get("step", 0) > step:
                continue
            keep.append(line)
        write_text_atomic(self.path, "".join(l + "\n" for l in keep))


class NullLog(MetricsLog):
    """The log of ranks other than 0 in a distributed run: writes nothing."""

    def __init__(self) -> None:
        self.path, self.tb = None, None

    def write(self, row: dict[str, Any]) -> None:
        pass

    def truncate_after(self, stage: str, step: int) -> None:
        pass


def report_problems(console: Console, problems: list, what: str, limit: int = 10) -> None:
    console.print(f"[yellow]{len(problems)} problem(s) in {what}:[/]")
    for p in problems[:limit]:
        console.print(f"  record {p.id} (#{p.index}) [{p.kind}]: {p.message}", markup=False, highlight=False)
    if len(problems) > limit:
        console.print(f"  ... and {len(problems) - limit} more (run `vlkit data check` for all)")


@dataclass
class BadImages:
    """Images that fail to decode during training (changed after the check): with ``data.skip_bad`` they are
    skipped and counted, otherwise the run stops naming the record and file, its last checkpoint kept."""

    skip: bool
    ckpt_dir: Path
    count: int = 0
    records: list[str] = field(default_factory=list)  # the first 100 skipped record ids (for summary.json)

    def take(self, bad: list[dict[str, Any]], n_global: int, console: Console) -> None:
        """Account for this step's bad images: ``bad`` on this process, ``n_global`` over all processes."""
        if not n_global:
            return
        if not self.skip:
            last = find_checkpoint(self.ckpt_dir / "last")
            kept = f"the last checkpoint is kept in {last}" if last else "the stage has no checkpoint yet"
            what = (f"record {bad[0]['id']} (#{bad[0]['index']}): {bad[0]['error']}" if bad
                    else f"{n_global} image(s) on another process failed to decode")
            raise DataError(f"{what}; training stopped ({kept}). Repair or remove the file (`vlkit data check` "
                            "decodes every image and lists each one that fails), then rerun the same command to "
                            "resume; or set data.skip_bad=true to skip such images (they are counted)")
        for b in bad:
            console.print(f"[yellow]skipped record {b['id']} (#{b['index']}): {b['error']} (data.skip_bad=true)[/]",
                          highlight=False)
            if len(self.records) < 100:
                self.records.append(str(b["id"]))
        self.count += int(n_global)


@dataclass
class StageData:
    train: LlavaDataset
    lengths: list[int]
    has_image: list[bool]
    eval_records: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0


def load_stage_data(recipe: Recipe, stage_name: str, model: VLM, transform: ImageTransform, console: Console) -> StageData:
    """Read and check a stage's data before step 1: stop, or skip bad records by policy, never mid-run."""
    stage = recipe.stages[stage_name]
    root = _resolve(recipe.data.image_root)
    path = _resolve(stage.data)
    records = load_records(path)
    tokenized = TokenizedCache(tokenized_dir(), path, model.tokenizer, model.image_token_id,
                               model.sequence_image_tokens, recipe.data.max_length)
    examples, problems = check_records(records, root, model.tokenizer, model.image_token_id, model.sequence_image_tokens,
                                       recipe.data.max_length, memo=tokenized.memo)
    unsaved = tokenized.save()  # the next run (or stage) over this file templates nothing again
    if unsaved:
        console.print(f"[yellow]{unsaved}[/]")
    if problems:
        report_problems(console, problems, path)
        if not recipe.data.skip_bad:
            raise DataError(f"{len(problems)} bad record(s) in {path} (stage '{stage_name}'); fix them, or set "
                            "data.skip_bad=true to skip them (they are reported)")
        console.print(f"[yellow]skipping {len(problems)} record(s) (data.skip_bad=true)[/]")
    if not examples:
        raise DataError(f"no usable records in {path}")
    eval_records = load_records(_resolve(stage.eval_data))[: stage.eval_max_samples] if stage.eval_data else []
    return StageData(LlavaDataset(examples, root, transform, keep_bad=True), [e.length for e in examples],
                     [e.image is not None for e in examples], eval_records, len(problems))


def preflight(model: VLM, batch: dict[str, Any], console: Console, tokenizer) -> dict[str, float]:
    """Before step 1: every sample has a supervised token; image tokens match; embedding norms are sane."""
    from vlkit.inspect import render_example

    labels = batch["labels"]
    for b in range(labels.shape[0]):
        if not bool((labels[b, 1:] != -100).any()):
            ids = batch["input_ids"][b][batch["attention_mask"][b].bool()].tolist()
            view = render_example(tokenizer, ids, labels[b][batch["attention_mask"][b].bool()].tolist(),
                                  model.image_token_id)
            raise TrainingError(f"sample {batch['index'][b]} has no supervised token (every label is masked: the "
                                f"'loss is 0' bug; check the chat template). Its masked template:\n{view.plain}")
    n_img = int((batch["input_ids"] == model.image_token_id).sum())
    n_images = sum(k is not None for k in batch["image_keys"])
    if n_img != n_images * model.sequence_image_tokens:
        raise TrainingError(f"{n_img} image tokens in the batch but {n_images} images x {model.sequence_image_tokens} "
                            "tokens expected")
    with torch.no_grad():
        text = model.llm.embed_tokens(batch["input_ids"][batch["attention_mask"].bool()
                                                         & (batch["input_ids"] != model.image_token_id)])
        facts = {"text_embed_norm": float(text.norm(dim=-1).mean())}
        if batch["pixel_values"] is not None:
            img = model.encode_images(batch["pixel_values"])
            facts["image_embed_norm"] = float(img.norm(dim=-1).mean())
    console.print("pre-flight: " + ", ".join(f"{k}={v:.3f}" for k, v in facts.items())
                  + f", {n_img} image tokens = {n_images} images x {model.sequence_image_tokens}: ok")
    return facts


def micro_batch_size(stage: StageConfig) -> int:
    if stage.batch_size % stage.grad_accum:
        raise ValueError(f"batch_size {stage.batch_size} is not divisible by grad_accum {stage.grad_accum}")
    return stage.batch_size // stage.grad_accum


def stage_steps(stage: StageConfig, num_samples: int) -> int:
    """Optimizer steps of a stage: ``max_steps``, else ``epochs`` over the data at the global batch size."""
    return stage.max_steps or max(1, int(math.ceil(num_samples / stage.batch_size) * stage.epochs))


def estimate_steps(recipe: Recipe) -> dict[str, int]:
    """Steps per stage without building the model (counts records when ``max_steps`` is not set)."""
    out = {}
    for name in recipe.train.stages:
        st = recipe.stages[name]
        out[name] = st.max_steps or stage_steps(st, len(load_records(_resolve(st.data))))
    return out


def images_read(data: StageData, micro: int, seed: int, group_by_length: bool, micro_batches: int) -> list[str]:
    """The images of the samples that the stage's first ``micro_batches`` micro-batches draw (epoch after epoch, in
    the order training uses), so the feature cache encodes what a short run reads, not the whole data file."""
    drawn: set[int] = set()
    epoch = 0
    while micro_batches > 0 and len(drawn) < len(data.train):
        order = epoch_batches(data.lengths, data.has_image, micro, seed, epoch, group_by_length)
        for batch in order[:micro_batches]:
            drawn.update(batch)
        micro_batches -= len(order)
        epoch += 1
    return [data.train.examples[i].image for i in sorted(drawn) if data.train.examples[i].image]


# ---- the shared loop -----------------------------------------------------------------------------------------------
def run_stage(model: VLM, recipe: Recipe, stage_name: str, run_dir: Path, device: torch.device, console: Console,
              log: MetricsLog, dry_run: bool = False, features_fn: Callable | None = None,
              stop_after: int | None = None, ctx: DistContext | None = None) -> dict[str, Any]:
    ctx = ctx or DistContext(device=device)  # the process's place in a distributed job (default: alone)
    stage = recipe.stages[stage_name]
    set_trainable(model, stage)
    transform = ImageTransform(model.encoder.image_size, model.encoder.mean, model.encoder.std)
    t_phase = time.time()
    data = load_stage_data(recipe, stage_name, model, transform, console)
    phases = {"checks_s": time.time() - t_phase}  # where the stage's time goes (a study's report sums them)
    seed = recipe.train.seed
    if features_fn is not None and stage.unfreeze_encoder_blocks:
        console.print(f"[yellow]stage '{stage_name}' trains encoder blocks: feature cache not used in this stage[/]")
        features_fn = None
    micro = micro_batch_size(stage)
    if features_fn is not None:  # only the images this stage will draw: max_steps may read a fraction of the data
        images = images_read(data, micro, seed, recipe.data.group_by_length,
                             stage_steps(stage, len(data.train)) * stage.grad_accum)
        images += [r.get("image") for r in data.eval_records]
        with ctx.main_first():  # rank 0 fills the cache, the others then read it
            features_fn.prepare(images, _resolve(recipe.data.image_root), transform)
        data.train.load_images = False
    phases["cache_s"] = time.time() - t_phase - phases["checks_s"]

    if ctx.world_size > micro:
        console.print(f"[yellow]{ctx.world_size} processes but micro-batches of {micro}: some ranks idle (weight 0) "
                      "on every micro-batch; raise batch_size or lower grad_accum[/]")
    total_steps = stage_steps(stage, len(data.train))
    ckpt_dir = run_dir / "checkpoints" / stage_name
    step, epoch, batch_pos = 0, 0, 0
    found = find_checkpoint(ckpt_dir / "last")
    state: dict[str, Any] = {}
    bad_images = BadImages(recipe.data.skip_bad, ckpt_dir)
    if found is not None:  # weights and RNG now; the optimizer's state once the stage's engine exists
        state = load_checkpoint(found, model, None)
        step, epoch, batch_pos = state["step"], state["epoch"], state["batch_pos"]
        bad_images.count = state.get("skipped_images", 0)
        bad_images.records = list(state.get("skipped_image_records", []))
        console.print(f"resuming stage '{stage_name}' at step {step} (epoch {epoch}, batch {batch_pos})")
        pin_threads(state, recipe.train.deterministic, console)
    log.truncate_after(stage_name, step)  # also a restart from step 0: rows of a run killed before its checkpoint

    counts = parameter_counts(model)
    trainable = sum(c["trainable"] for c in counts.values())
    all_batches = epoch_batches(data.lengths, data.has_image, micro, seed, 0, recipe.data.group_by_length)
    pad_frac = padding_fraction(data.lengths, all_batches)
    console.print(f"[bold]stage {stage_name}[/]: {len(data.train)} samples, {total_steps} steps x {stage.batch_size} "
                  f"(micro {micro} x accum {stage.grad_accum}), trainable {trainable:,} params, "
                  f"padding {pad_frac:.1%}, llm={stage.llm}"
                  + (f", {ctx.mode} over {ctx.world_size} processes" if ctx.active else ""))
    collator = Collator(model.tokenizer.pad_token_id)
    amp = autocast_dtype(recipe.train.precision, device)
    model.train()

    def micro_batches():
        # global micro-batches from (seed, epoch); each rank collates its slice (dummy: an idle rank, weight 0).
        # The order is fixed before loading, so data.num_workers loader processes keep it (and exact resume).
        nonlocal epoch, batch_pos
        while True:
            order = epoch_batches(data.lengths, data.has_image, micro, seed, epoch, recipe.data.group_by_length)
            shards = [shard_batch(b, ctx.rank, ctx.world_size) for b in order[batch_pos:]]
            # its own generator: a DataLoader draws a seed when iterated, which would shift the global RNG that
            # dropout uses (and break exact resume, which restores that RNG mid-epoch)
            loader = torch.utils.data.DataLoader(data.train, batch_sampler=[idx for idx, _ in shards],
                                                 collate_fn=collator, num_workers=recipe.data.num_workers,
                                                 generator=torch.Generator().manual_seed(seed))
            for (_, dummy), batch in zip(shards, loader):
                batch_pos += 1
                batch["dummy"] = dummy or batch.pop("all_bad")  # every image of this slice failed: weight 0
                yield batch
            epoch, batch_pos = epoch + 1, 0

    stream = micro_batches()
    first = None
    if step == 0 and found is None:  # before wrapping: ZeRO-3 / FSDP shard the weights these checks read
        first = [move(next(stream), device) for _ in range(stage.grad_accum)]
        preflight(model, first[0], console, model.tokenizer)

    def make_optimizer() -> torch.optim.Optimizer:
        return torch.optim.AdamW(param_groups(model, stage), betas=(0.9, 0.999))

    # the stage's model + optimizer under the job's strategy (none, ddp, deepspeed, fsdp: vlkit/distributed.py)
    check_same_modules(ctx, data.has_image, recipe.data.group_by_length)
    engine = make_engine(ctx, model, make_optimizer, stage, micro, ckpt_dir, find_unused=not all(data.has_image))
    optimizer = engine.optimizer
    scheduler = cosine_with_warmup(optimizer, int(stage.warmup_ratio * total_steps), total_steps)
    if found is not None:
        engine.load_optimizer(found, state, lambda msg: console.print(f"[yellow]{msg}[/]"))
        scheduler.load_state_dict(state["scheduler"])
    t_start, tokens_seen, last_loss = time.time(), 0, float("nan")
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f} lr {task.fields[lr]:.2e} {task.fields[tps]:.0f} tok/s"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal and dry_run) as progress:
        task = progress.add_task(progress_label(model, stage_name), total=total_steps, completed=step, loss=float("nan"), lr=0.0, tps=0.0)
        while step < total_steps:
            engine.zero_grad()
            parts = first or [move(next(stream), device) for _ in range(stage.grad_accum)]
            first = None
            n_total = sum(int((p["labels"][:, 1:] != -100).sum()) for p in parts if not p["dummy"])
            bad = [b for p in parts for b in p["bad"]]
            n_bad = len(bad)
            if ctx.active:  # token-weighted over the global batch: every rank divides by the same count
                n_total, n_bad = (int(v) for v in ctx.all_sum(n_total, n_bad))
            bad_images.take(bad, n_bad, console)  # stops here (before the step) unless data.skip_bad
            loss_sum, step_tokens = 0.0, 0
            t0 = time.time()
            for k, batch in enumerate(parts):
                feats = features_fn(batch) if features_fn else None
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
            if ctx.active:
                loss_sum, step_tokens = ctx.all_sum(loss_sum, step_tokens)
            tokens_seen += int(step_tokens)
            loss = loss_sum / max(n_total, 1)
            if not math.isfinite(loss):
                raise TrainingError(f"stage '{stage_name}' step {step + 1}: loss is {loss}; stopped. The last good "
                                    f"checkpoint is kept in {ckpt_dir / 'last'}")
            grad_norm = engine.step(stage.max_grad_norm)  # clip (if set) and step
            scheduler.step()
            step += 1
            last_loss = loss
            dt = time.time() - t0
            tps = step_tokens / max(dt, 1e-9)
            lr = optimizer.param_groups[0]["lr"]
            row = {"stage": stage_name, "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": tps, "supervised_tokens": n_total, "epoch": epoch}
            if bad_images.count:
                row["skipped_images"] = bad_images.count  # so far in this stage (data.skip_bad)
            log.write(row)
            progress.update(task, completed=step, loss=loss, lr=lr, tps=tps)
            if not console.is_terminal and (step % max(1, total_steps // 20) == 0 or step == total_steps):
                # logs and CI have no live bar: a plain line every 5% of the stage
                console.print(f"{stage_name} step {step}/{total_steps} loss {loss:.4f} lr {lr:.2e} {tps:.0f} tok/s "
                              f"elapsed {time.time() - t_start:.0f} s")
            if dry_run:
                console.print(f"dry run: one step done, loss {loss:.4f}")
                engine.close()
                return {"dry_run": True, "loss": loss, "step_time_s": dt}
            if step % stage.save_every == 0 or step == total_steps:
                engine.save(ckpt_dir / "last",
                            {"stage": stage_name, "step": step, "epoch": epoch, "batch_pos": batch_pos,
                             "scheduler": scheduler.state_dict(), "recipe_identity": recipe.identity(),
                             "skipped_images": bad_images.count, "skipped_image_records": bad_images.records,
                             "threads": torch.get_num_threads()})
            if stop_after is not None and step >= stop_after:
                engine.close()
                return {"stopped_at": step}
            if stage.eval_every and step % stage.eval_every == 0 and step < total_steps and data.eval_records:
                if not ctx.shards_weights:  # rank 0 evaluates, the others wait
                    m = ctx.on_main(lambda: run_eval(model, recipe, stage, data, transform, device, features_fn), {})
                    log.write({"stage": stage_name, "step": step, **_scalars(m)})
                elif step == stage.eval_every:
                    console.print(f"[yellow]eval_every: skipped while {ctx.mode} shards the weights; the stage is "
                                  "evaluated when it ends[/]")
    wall = time.time() - t_start
    metrics: dict[str, Any] = {"steps": step, "final_loss": last_loss, "wall_time_s": wall,
                               "tokens_per_s": tokens_seen / max(wall, 1e-9), "padding_fraction": pad_frac,
                               "trainable_params": trainable, "skipped_records": data.skipped,
                               "skipped_images": bad_images.count, "skipped_image_records": bad_images.records,
                               "num_image_tokens": model.num_image_tokens, "threads": torch.get_num_threads(),
                               "time_s": {**phases, "train_s": wall}}  # train_s includes eval_every evaluations
    engine.save(ckpt_dir / "final", {"stage": stage_name, "step": step, "epoch": 0, "batch_pos": 0,
                                     "recipe_identity": recipe.identity(), "threads": torch.get_num_threads()},
                with_optimizer=False)
    engine.close()
    if ctx.shards_weights:  # FSDP / ZeRO-3 leave the weights split: train() evaluates a fresh unsharded copy
        metrics["rebuild"] = True
        return metrics
    if data.eval_records:
        t_eval = time.time()
        m = ctx.on_main(lambda: run_eval(model, recipe, stage, data, transform, device, features_fn), {})
        log.write({"stage": stage_name, "step": step, **_scalars(m)})
        metrics.update(m)
        metrics["time_s"]["eval_s"] = time.time() - t_eval
    return metrics


def _scalars(m: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in m.items() if isinstance(v, (int, float))}
    out.update({f"acc/{k}": v for k, v in m.get("accuracy_by_type", {}).items()})
    return out


def run_eval(model: VLM, recipe: Recipe, stage: StageConfig, data: StageData, transform, device, features_fn):
    return evaluate(model, data.eval_records, _resolve(recipe.data.image_root), transform, device,
                    recipe.data.max_length, stage.eval_batch_size, stage.max_new_tokens, features_fn)


# ---- the recipe ----------------------------------------------------------------------------------------------------
def default_run_dir(recipe: Recipe, run_dir: Path | None) -> Path:
    """``run_dir`` as given, else ``train.output_dir/<train.run_name or recipe name>``."""
    return Path(run_dir or Path(recipe.train.output_dir) / (recipe.train.run_name or recipe.name))


def prepare_run_dir(recipe: Recipe, run_dir: Path | None) -> Path:
    run_dir = default_run_dir(recipe, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = run_dir / "config.yaml"
    ident = run_dir / "identity.txt"
    if ident.exists() and ident.read_text().strip() != recipe.identity():
        raise ValueError(f"run directory {run_dir} holds a run of a different config (identity "
                         f"{ident.read_text().strip()} != {recipe.identity()}); choose another train.run_name or "
                         "remove the directory")
    write_text_atomic(cfg, dump_recipe(recipe))
    write_text_atomic(ident, recipe.identity() + "\n")
    return run_dir


STAGE_METRICS = "metrics.json"  # a finished stage's summary entry, kept beside its final checkpoint


def stage_metrics_path(run_dir: Path, stage: str) -> Path:
    return run_dir / "checkpoints" / stage / "final" / STAGE_METRICS


def load_summary(run_dir: Path, recipe: Recipe, console: Console) -> dict[str, Any]:
    """``summary.json`` as written last; when it is cut short or damaged, rebuilt (see :func:`recorded_stages`)."""
    path = run_dir / "summary.json"
    if not path.exists():
        return {"stages": {}}
    try:
        summary = read_json(path, "")
        if not isinstance(summary, dict) or not isinstance(summary.get("stages"), dict):
            raise StateError(f"{path} does not hold a run summary (an object with 'stages')")
        return summary
    except StateError as exc:
        stages = recorded_stages(run_dir, recipe)
        console.print(str(exc), style="yellow", markup=False, highlight=False)
        console.print(f"[yellow]rebuilt {path.name} from the final checkpoints of the finished stages "
                      f"({', '.join(stages) or 'none'}); the others resume from their checkpoints[/]")
        return {"stages": stages, "wall_time_s": sum(m.get("wall_time_s", 0.0) for m in stages.values()),
                "rebuilt": {"from": "checkpoints/*/final/" + STAGE_METRICS, "reason": str(exc)}}


def recorded_stages(run_dir: Path, recipe: Recipe) -> dict[str, Any]:
    """The summary entries of finished stages, in order, from ``checkpoints/<stage>/final/metrics.json``.

    Stops at the first stage without one: later stages were trained on top of it. A stage whose final checkpoint
    lacks the file (written by vlkit before it kept one) resumes at its last step, which re-runs its evaluation."""
    stages: dict[str, Any] = {}
    for name in recipe.train.stages:
        path = stage_metrics_path(run_dir, name)
        if find_checkpoint(path.parent) is None or not path.exists():
            break
        stages[name] = read_json(path, f"Delete it to have stage '{name}' evaluated again on the next run")
    return stages


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


def final_eval(model: VLM, recipe: Recipe, stage_name: str, device: torch.device, features_fn) -> dict[str, Any]:
    """The end-of-stage evaluation of a stage trained with sharded weights, on an unsharded model."""
    stage = recipe.stages[stage_name]
    records = load_records(_resolve(stage.eval_data))[: stage.eval_max_samples]
    transform = ImageTransform(model.encoder.image_size, model.encoder.mean, model.encoder.std)
    data = StageData(None, [], [], records)  # type: ignore[arg-type]
    return run_eval(model, recipe, stage, data, transform, device, features_fn)


def train(recipe: Recipe, run_dir: Path | None = None, console: Console | None = None, dry_run: bool = False,
          features: Any = None, stop_after: tuple[str, int] | None = None) -> dict[str, Any]:
    """Run the recipe's stages in order; resumes automatically from the run directory's checkpoints.

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
    seed_everything(recipe.train.seed, recipe.train.deterministic)
    ctx = setup_distributed(recipe, pick_device(recipe.train.device), console)
    device = ctx.device
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
    summary_path = run_dir / "summary.json"
    summary = load_summary(run_dir, recipe, console)
    summary.update({"recipe": recipe.name, "identity": recipe.identity(), "status": "running"})
    log = MetricsLog(run_dir / "metrics.jsonl") if ctx.is_main else NullLog()
    t0 = time.time()

    def write_summary() -> None:
        if ctx.is_main:
            write_json_atomic(summary_path, summary)

    model = build_model(recipe).to(device)
    if random_weight_parts(model):  # components built with random_init (asked for, never silent): every line says so
        summary["random_weights"] = random_weight_parts(model)
        tag_console(console, summary["random_weights"], held)
    summary["num_image_tokens"] = model.num_image_tokens
    summary["build_s"] = time.time() - t0  # the model from its weights (encoder, LLM, tokenizer)
    features_fn = features.for_model(model, device) if features is not None else None
    for i, stage_name in enumerate(recipe.train.stages):
        done = find_checkpoint(run_dir / "checkpoints" / stage_name / "final")
        recorded = stage_metrics_path(run_dir, stage_name)
        if done is not None and stage_name not in summary["stages"] and recorded.exists():
            # killed after the stage was recorded beside its checkpoint, before summary.json was rewritten
            summary["stages"][stage_name] = read_json(recorded, f"Delete it to have stage '{stage_name}' evaluated again")
        if done is not None and stage_name in summary["stages"]:
            set_trainable(model, recipe.stages[stage_name])
            load_trainable(model, done / "trainable.safetensors")
            console.print(f"stage '{stage_name}' already finished: loaded {done}")
            # the next stage starts as it would have in the first process: with that process's thread count
            pin_threads(read_json(done / "state.json", f"Delete {done.parent} to train stage '{stage_name}' "
                                  "again"), recipe.train.deterministic, console)
            continue
        m = run_stage(model, recipe, stage_name, run_dir, device, console, log, dry_run, features_fn,
                      stop_after[1] if stop_after and stop_after[0] == stage_name else None, ctx=ctx)
        if dry_run or "stopped_at" in m:
            ctx.close()
            return m
        if m.pop("rebuild", False):  # FSDP / ZeRO-3 left the weights sharded: go on with an unsharded copy
            model = rebuild_model(recipe, run_dir, device, recipe.train.stages[: i + 1])
            features_fn = features.for_model(model, device) if features is not None else None
            if recipe.stages[stage_name].eval_data:
                ev = ctx.on_main(lambda: final_eval(model, recipe, stage_name, device, features_fn), {})
                log.write({"stage": stage_name, "step": m["steps"], **_scalars(ev)})
                m.update(ev)
        summary["stages"][stage_name] = {k: v for k, v in m.items() if k != "examples"}
        if ctx.is_main:  # first beside the checkpoint: summary.json can always be rebuilt from these
            write_json_atomic(stage_metrics_path(run_dir, stage_name), summary["stages"][stage_name])
        write_summary()
        if "accuracy" in m:
            print_accuracy(console, stage_name, m)
    summary.update({"status": "finished", "wall_time_s": summary.get("wall_time_s", 0) + time.time() - t0,
                    "peak_rss_mb": peak_rss_mb(), "parameters": parameter_counts(model)})
    if ctx.active:
        summary["distributed"] = {"mode": ctx.mode, "world_size": ctx.world_size}
    write_summary()
    ctx.barrier()
    ctx.close()
    return summary


def print_accuracy(console: Console, stage: str, m: dict[str, Any]) -> None:
    from rich.table import Table

    if list(m["accuracy_by_type"]) == ["all"]:  # no question types (a caption set): BLEU is the measure
        console.print(f"{stage}: {m['n']} generations, exact match {m['accuracy']:.3f}")
    else:
        table = Table(title=f"{stage}: generation accuracy (exact match) on {m['n']} samples")
        table.add_column("question type")
        table.add_column("n", justify="right")
        table.add_column("accuracy", justify="right")
        for k, v in m["accuracy_by_type"].items():
            table.add_row(k, str(m["count_by_type"][k]), f"{v:.3f}")
        table.add_row("[bold]all", str(m["n"]), f"[bold]{m['accuracy']:.3f}")
        console.print(table)
    console.print(f"val loss {m['val_loss']:.4f} (ppl {m['val_perplexity']:.2f}), BLEU {m['bleu']:.1f}")
