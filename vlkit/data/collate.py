"""Batching: pad varying text lengths, stack images, group batches by length and modality."""
from __future__ import annotations

import random
from typing import Any, Sequence

import torch

IGNORE = -100


class Collator:
    """Right-pads ``input_ids``/``labels`` (left-pads when ``left_pad``, for generation) and stacks images."""

    def __init__(self, pad_token_id: int, left_pad: bool = False) -> None:
        self.pad_token_id, self.left_pad = pad_token_id, left_pad

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        # items of variable length T_i -> input_ids/labels/attention_mask [B, max T_i], pixel_values [I, 3, S, S]
        # items whose image failed to decode (``bad``, see LlavaDataset.keep_bad) are left out and listed in "bad";
        # when every item is bad the first one stays (blank image) and "all_bad" asks the trainer to weight it 0
        bad = [{"index": it["index"], "id": it.get("id"), "image": it.get("image_key"), "error": it["bad"]}
               for it in items if it.get("bad")]
        kept = [it for it in items if not it.get("bad")]
        all_bad = not kept
        items = kept or items[:1]
        longest = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), longest), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            sl = slice(longest - n, longest) if self.left_pad else slice(0, n)
            ids[b, sl] = torch.as_tensor(it["input_ids"])
            labels[b, sl] = torch.as_tensor(it["labels"])
            mask[b, sl] = 1
        images = [it["pixel_values"] for it in items if it.get("pixel_values") is not None]
        pixel_values = torch.stack(images) if images else None
        image_index = torch.tensor([b for b, it in enumerate(items) if it.get("image_key") is not None], dtype=torch.long)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pixel_values,
                "image_index": image_index,
                "index": [it["index"] for it in items], "image_keys": [it.get("image_key") for it in items],
                "bad": bad, "all_bad": all_bad}


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of padded positions over all batches."""
    total = real = 0
    for batch in batches:
        ls = [lengths[i] for i in batch]
        total += max(ls) * len(ls)
        real += sum(ls)
    return 1.0 - real / total if total else 0.0


def epoch_batches(lengths: Sequence[int], has_image: Sequence[bool], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True, megabatch_mult: int = 32) -> list[list[int]]:
    """The batches of one epoch, deterministic in (seed, epoch) so that resume can skip to a batch index.

    With grouping (LLaVA's ``group_by_modality_length``): image and text-only samples are batched separately,
    samples within megabatches of ``batch_size * megabatch_mult`` are sorted by length, batches are then shuffled.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    for modality in (True, False):
        idx = [i for i in order if bool(has_image[i]) == modality]
        mega = batch_size * megabatch_mult
        for start in range(0, len(idx), mega):
            chunk = sorted(idx[start:start + mega], key=lambda i: -lengths[i])
            batches.extend(chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches
