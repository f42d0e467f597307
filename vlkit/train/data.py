"""A stage's data, before and during its steps: records read and checked (bad records stopped or skipped by policy),
images that fail to decode mid-run (:class:`BadImages`), the feature cache filled with what the stage will draw, and
the pre-flight check of the first batch, and the stream of micro-batches in the order that exact resume relies on."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from rich.console import Console

from vlkit.checkpoint import find_checkpoint
from vlkit.config import Recipe, StageConfig
from vlkit.data.collate import Collator, epoch_batches
from vlkit.data.llava import DataError, ImageTransform, LlavaDataset, check_records, load_records
from vlkit.data.tokenized import TokenizedCache
from vlkit.data.tokenized import default_dir as tokenized_dir
from vlkit.distributed import DistContext, shard_batch
from vlkit.evaluate import move
from vlkit.model import VLM, resolve_ref


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, failed pre-flight check)."""


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
    root = resolve_ref(recipe.data.image_root)
    path = resolve_ref(stage.data)
    records = load_records(path)
    tokenized = TokenizedCache(tokenized_dir(), path, model.tokenizer, model.image_token_id,
                               model.image_span, recipe.data.max_length)
    examples, problems = check_records(records, root, model.tokenizer, model.image_token_id, model.image_span,
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
    eval_records = load_records(resolve_ref(stage.eval_data))[: stage.eval_max_samples] if stage.eval_data else []
    return StageData(LlavaDataset(examples, root, transform, keep_bad=True), [e.length for e in examples],
                     [e.image is not None for e in examples], eval_records, len(problems))


def preflight(model: VLM, batch: dict[str, Any], console: Console, tokenizer,
              features_fn: Any = None) -> dict[str, float]:
    """Before step 1: every sample has a supervised token; image tokens match; embedding norms are sane.

    The norms are printed: image tokens far longer than the text embeddings around them (e.g. 115 against 1.24, the
    default before ``projector.out_norm``) is what the study of docs/toyworld.md, "Image tokens at the text's
    norm", found behind position questions answered at chance. With the feature cache on, the images come from it."""
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
        img = None
        if features_fn is not None and any(k is not None for k in batch["image_keys"]):
            img = model.project(features_fn(batch))  # [B_img, M, D] from the cached encoder features
        elif batch["pixel_values"] is not None:
            img = model.encode_images(batch["pixel_values"])
        if img is not None:
            facts["image_embed_norm"] = float(img.norm(dim=-1).mean())
    console.print("pre-flight: " + ", ".join(f"{k}={v:.3f}" for k, v in facts.items())
                  + f", {n_img} image tokens = {n_images} images x {model.sequence_image_tokens}: ok")
    return facts


def prepare_features(features_fn: Any, data: StageData, recipe: Recipe, stage_name: str, transform: ImageTransform,
                     ctx: DistContext, console: Console) -> Any:
    """The feature cache for this stage (None when it trains encoder blocks): filled with only the images the stage
    will draw (max_steps may read a fraction of the data) and the evaluation's; the dataset then skips image loading."""
    stage = recipe.stages[stage_name]
    if features_fn is not None and stage.unfreeze_encoder_blocks:
        console.print(f"[yellow]stage '{stage_name}' trains encoder blocks: feature cache not used in this stage[/]")
        return None
    if features_fn is None:
        return None
    images = images_read(data, micro_batch_size(stage), recipe.train.seed, recipe.data.group_by_length,
                         stage_steps(stage, len(data.train)) * stage.grad_accum)
    images += [r.get("image") for r in data.eval_records]
    with ctx.main_first():  # rank 0 fills the cache, the others then read it
        features_fn.prepare(images, resolve_ref(recipe.data.image_root), transform)
    data.train.load_images = False
    return features_fn


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
        out[name] = st.max_steps or stage_steps(st, len(load_records(resolve_ref(st.data))))
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


@dataclass
class Position:
    """Where a stage stands: optimizer steps done, and the next micro-batch (its epoch, its index in the epoch)."""

    step: int = 0
    epoch: int = 0
    batch_pos: int = 0


class MicroBatchStream:
    """Global micro-batches from (seed, epoch), each rank collating its slice (dummy: an idle rank, weight 0).

    The order is fixed before loading, so ``data.num_workers`` loader processes keep it (and exact resume); the
    stream advances ``position`` (epoch, batch_pos) as it yields. :meth:`close` ends the loader's processes."""

    def __init__(self, data: StageData, recipe: Recipe, micro: int, ctx: DistContext, collator: Collator,
                 position: Position) -> None:
        self.position = position
        self._batches = _micro_batches(data, recipe, micro, ctx, collator, position)  # holds no reference to self

    def __next__(self) -> dict[str, Any]:
        return next(self._batches)

    def take(self, n: int, device: torch.device) -> list[dict[str, Any]]:
        """The next ``n`` micro-batches (one optimizer step's), on ``device``."""
        return [move(next(self), device) for _ in range(n)]

    def close(self) -> None:
        self._batches.close()


def _micro_batches(data: StageData, recipe: Recipe, micro: int, ctx: DistContext, collator: Collator,
                   pos: Position) -> Iterator[dict[str, Any]]:
    seed = recipe.train.seed
    while True:
        order = epoch_batches(data.lengths, data.has_image, micro, seed, pos.epoch, recipe.data.group_by_length)
        shards = [shard_batch(b, ctx.rank, ctx.world_size) for b in order[pos.batch_pos:]]
        # its own generator: a DataLoader draws a seed when iterated, which would shift the global RNG that
        # dropout uses (and break exact resume, which restores that RNG mid-epoch)
        loader = torch.utils.data.DataLoader(data.train, batch_sampler=[idx for idx, _ in shards],
                                             collate_fn=collator, num_workers=recipe.data.num_workers,
                                             generator=torch.Generator().manual_seed(seed))
        for (_, dummy), batch in zip(shards, loader):
            pos.batch_pos += 1
            batch["dummy"] = dummy or batch.pop("all_bad")  # every image of this slice failed: weight 0
            yield batch
        pos.epoch, pos.batch_pos = pos.epoch + 1, 0
