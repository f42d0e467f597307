"""Pretraining of toy-clip (contrastive, on position-free captions) and toy-lm (scene text + questions as chat).

Both are plain step loops from a fixed seed; with a fixed torch thread count the weights are a function of the
config. ``pretraining.py`` runs them (side by side, one process each) and writes the shipped files.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vlkit.data import toy

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
Update = Callable[..., None]


# ---- shared helpers -------------------------------------------------------------------------------------------
def load_images(data_dir: Path, records: list[dict]) -> "torch.Tensor":
    """The records' images as one uint8 tensor ``[N, 3, H, W]``."""
    import torch
    from PIL import Image

    arr = np.stack([np.asarray(Image.open(data_dir / "images" / r["image"]).convert("RGB")) for r in records])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def normalize(images_u8: "torch.Tensor") -> "torch.Tensor":
    """uint8 ``[B, 3, H, W]`` -> CLIP-normalised float ``[B, 3, H, W]`` (what the saved image processor does)."""
    import torch

    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images_u8.float() / 255.0 - mean) / std


def clip_text(tok, captions: list[str]) -> dict[str, "torch.Tensor"]:
    enc = tok([c + tok.eos_token for c in captions], padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def _step(model_loss: "torch.Tensor", model, opt) -> float:
    """One optimiser step with gradient clipping at 1.0; returns the loss."""
    import torch

    opt.zero_grad(set_to_none=True)
    model_loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return model_loss.item()


def _resumed(start: int) -> dict[str, int]:
    """The report's note that a loop's times cover only the steps after ``start`` (absent for a straight run)."""
    return {"resumed_at_step": start} if start else {}


class StepCheckpoint:
    """The resumable state of a pretraining loop, in ``ckpt_dir/state.pt``: model and optimiser states, the
    number of steps done, the losses so far and the loop's own RNG state (``extra``). Saved every ``every`` steps
    (write to a temporary file, then rename: a kill mid-save leaves the previous checkpoint whole), so an
    interrupted hour of pretraining resumes instead of starting over. Nothing else carries state from one step
    to the next (no dropout, the data order is a function of the seed), so a resumed loop computes the same
    weights as one that was never stopped: ``tests/test_toyworld.py`` checks the hashes. ``ckpt_dir=None``: no
    checkpoints."""

    FILE = "state.pt"

    def __init__(self, ckpt_dir: Path | None, every: int, key: str):
        self.dir, self.every, self.key = (Path(ckpt_dir) if ckpt_dir is not None else None), max(1, every), key

    def restore(self, model, opt) -> tuple[int, list[float], Any]:
        """(steps done, losses, extra) of the last checkpoint, loaded into ``model`` and ``opt``; (0, [], None)
        when there is none."""
        import torch

        path = self.dir / self.FILE if self.dir is not None else None
        if path is None or not path.is_file():
            return 0, [], None
        try:
            state = torch.load(path, weights_only=True)
            if state["key"] != self.key:
                raise RuntimeError(f"it belongs to another config or version ({state['key']!r}, this one is "
                                   f"{self.key!r})")
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            torch.set_rng_state(state["torch_rng"])
            return int(state["step"]), [float(v) for v in state["losses"]], state["extra"]
        except Exception as e:  # any failure to read or apply it: one message with the file and the way out
            raise RuntimeError(f"toy world: cannot resume from the pretraining checkpoint {path}: {e}; delete it "
                               f"(or run with --restart) to start this job over") from e

    def save(self, step: int, total: int, model, opt, losses: list[float], extra: Any = None) -> None:
        """Checkpoint after ``step`` steps, every ``every`` steps and never after the last (the saved model is)."""
        import torch

        if self.dir is None or step % self.every or step >= total:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{self.FILE}.{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            torch.save({"key": self.key, "step": step, "model": model.state_dict(), "opt": opt.state_dict(),
                        "losses": losses, "torch_rng": torch.get_rng_state(), "extra": extra}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.dir / self.FILE)


# ---- toy-clip -------------------------------------------------------------------------------------------------
def hard_negative(objs: list, rng: np.random.Generator) -> list:
    """``objs`` with one fact changed that the scene's colours alone cannot reveal: half the time (when two objects
    differ in both colour and shape) the shapes of two objects are swapped, which keeps the bag of colours and the
    bag of shapes and changes only which colour goes with which shape; otherwise one object takes another shape.
    A caption of it is a hard negative for the image (NegCLIP, Yuksekgonul et al. 2023): contrastive training on
    scenes of 6-8 objects otherwise tells images apart by their colours and leaves shape unlearnt."""
    import dataclasses

    objs = list(objs)
    pairs = [(a, b) for a in range(len(objs)) for b in range(a + 1, len(objs))
             if objs[a].shape != objs[b].shape and objs[a].colour != objs[b].colour]
    if pairs and rng.random() < 0.5:
        a, b = pairs[int(rng.integers(len(pairs)))]
        objs[a], objs[b] = (dataclasses.replace(objs[a], shape=objs[b].shape),
                            dataclasses.replace(objs[b], shape=objs[a].shape))
        return objs
    k = int(rng.integers(len(objs)))
    others = [s for s in toy.SHAPES if s != objs[k].shape]
    objs[k] = dataclasses.replace(objs[k], shape=others[int(rng.integers(len(others)))])
    return objs


def contrastive_loss(logits_per_image: "torch.Tensor") -> "torch.Tensor":
    """CLIP's symmetric loss, ``[B, T] -> []``, where the texts are the B captions of the images followed by any
    hard negatives (T >= B): each image picks its caption among all T texts, each caption its image among the B."""
    import torch
    import torch.nn.functional as F

    b = logits_per_image.shape[0]
    target = torch.arange(b)
    return 0.5 * (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_image[:, :b].t(), target))


def cell_targets(scenes: list[dict], grid: int, image_size: int, patch_size: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """What each patch's cell holds, ``(colour, shape)``, each ``[N, P]`` long (P patches row-major; class 0 is an
    empty cell, then ``COLOURS_LIST`` / ``SHAPES`` in order). A patch belongs to the cell holding its centre, as
    ``fusion.cells`` assigns image tokens (8 x 8 patches over 3 x 3 cells: 3, 2, 3 rows and columns)."""
    import torch

    side = image_size // patch_size
    cell_of = ((np.arange(side) * patch_size + patch_size / 2) * grid / image_size).astype(int)
    colour = np.zeros((len(scenes), grid, grid), dtype=np.int64)
    shape = np.zeros((len(scenes), grid, grid), dtype=np.int64)
    for i, s in enumerate(scenes):
        for o in s["objects"]:
            colour[i, o["row"], o["col"]] = 1 + toy.COLOURS_LIST.index(o["colour"])
            shape[i, o["row"], o["col"]] = 1 + toy.SHAPES.index(o["shape"])
    rows, cols = np.meshgrid(cell_of, cell_of, indexing="ij")
    return (torch.from_numpy(colour[:, rows, cols].reshape(len(scenes), -1)),
            torch.from_numpy(shape[:, rows, cols].reshape(len(scenes), -1)))


def _cell_head(width: int):
    """A linear read-out of each patch token, ``[B, P, D] -> ([B, P, 1 + colours], [B, P, 1 + shapes])``: trained
    with toy-clip and then dropped (only the CLIPModel is saved), as MAE drops its decoder."""
    import torch
    from torch import nn

    class CellHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.colour = nn.Linear(width, 1 + len(toy.COLOURS_LIST))
            self.shape = nn.Linear(width, 1 + len(toy.SHAPES))

        def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # [B, P, D] -> [B, P, 7], [B, P, 6]
            return self.colour(tokens), self.shape(tokens)

    return CellHead()


def cell_loss(head, tokens: "torch.Tensor", colour: "torch.Tensor", shape: "torch.Tensor") -> "torch.Tensor":
    """Mean of the colour and the shape cross-entropy of every patch token ``[B, P, D]`` against its cell's
    contents ``[B, P]``."""
    import torch.nn.functional as F

    lc, ls = head(tokens)
    return 0.5 * (F.cross_entropy(lc.flatten(0, 1), colour.flatten()) + F.cross_entropy(ls.flatten(0, 1),
                                                                                          shape.flatten()))


def train_clip(data_dir: Path, tok, out_dir: Path, cfg: dict[str, Any], seed: int, update: Update,
               ckpt: StepCheckpoint | None = None) -> dict:
    """Contrastive pretraining of a tiny CLIPModel on position-free captions (objects in random order), so that
    the pooled CLS learns *what* is in an image and not *where*; saves model + image processor + tokenizer.
    ``cfg["cells"]`` (``{"weight": w, "layer": k}``, optional): add ``w`` x :func:`cell_loss` of a linear head on
    the patch tokens of ``hidden_states[k]`` (the layer a VLM reads), so that every patch token says what its cell
    holds; the CLS is still trained on position-free captions only. ``ckpt``: resume from its last checkpoint and
    write new ones."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    arch = cfg["arch"]
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), eos_token_id=eos, pad_token_id=eos, bos_token_id=eos, **arch["text"]),
        vision_config=dict(**arch["vision"]), projection_dim=arch["projection_dim"])
    model = CLIPModel(config)
    scenes = toy.load_scenes(data_dir, "train")
    images = load_images(data_dir, scenes)
    objs = [[toy.Obj(o["shape"], o["colour"], o["row"], o["col"], o["size"], 0, 0) for o in s["objects"]]
            for s in scenes]
    rng = np.random.default_rng([seed, 101])
    steps, batch, hard = cfg["steps"], cfg["batch"], bool(cfg.get("hard_negatives", False))
    cells = cfg.get("cells")
    trained = model
    if cells:
        vision = arch["vision"]
        grid = json.loads((Path(data_dir) / "meta.json").read_text())["grid"]
        colour_t, shape_t = cell_targets(scenes, grid, vision["image_size"], vision["patch_size"])
        head = _cell_head(vision["hidden_size"])
        trained = torch.nn.ModuleDict({"clip": model, "cells": head})  # one state for the optimiser and checkpoints
    opt = torch.optim.AdamW(trained.parameters(), lr=cfg["lr"], weight_decay=0.05, betas=(0.9, 0.98))
    ckpt = ckpt or StepCheckpoint(None, 1, "")
    start, losses, rng_state = ckpt.restore(trained, opt)
    if rng_state is not None:
        rng.bit_generator.state = json.loads(rng_state)
    model.train()
    for step in range(start, steps):
        idx = rng.choice(len(scenes), size=batch, replace=False)
        caps = [toy.clip_caption(objs[i], rng) for i in idx]
        if hard:
            caps += [toy.clip_caption(hard_negative(objs[i], rng), rng) for i in idx]
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, cfg["lr"], max(1, steps // 20))
        out = model(pixel_values=normalize(images[torch.from_numpy(idx)]), **clip_text(tok, caps),
                    output_hidden_states=bool(cells))
        loss = contrastive_loss(out.logits_per_image)
        if cells:
            rows = torch.from_numpy(idx)
            tokens = out.vision_model_output.hidden_states[cells["layer"]][:, 1:]  # [B, P, D], the CLS left out
            loss = loss + cells["weight"] * cell_loss(head, tokens, colour_t[rows], shape_t[rows])
        losses.append(_step(loss, trained, opt))
        update(step + 1, f"loss {np.mean(losses[-10:]):.3f}")
        ckpt.save(step + 1, steps, trained, opt, losses, json.dumps(rng.bit_generator.state))
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    size = arch["vision"]["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_resize=True, do_center_crop=True
                       ).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return {"params_vision": sum(p.numel() for p in model.vision_model.parameters()),
            "params_total": sum(p.numel() for p in model.parameters()),
            "train_loss_first": round(float(np.mean(losses[:10])), 4),
            "train_loss_last": round(float(np.mean(losses[-10:])), 4), **_resumed(start)}


# ---- toy-lm ---------------------------------------------------------------------------------------------------
def scene_messages(objs: list, grid: int, qas: list[tuple[str, str, str]], names: str = "words",
                   scene: str | None = None) -> list[dict[str, str]]:
    """A chat about a scene given as text: the first user turn carries ``Scene: <caption>.`` (or ``scene``, the
    same caption written otherwise)."""
    msgs = []
    scene = scene if scene is not None else toy.caption(objs, grid, names)
    for k, (_, q, a) in enumerate(qas):
        content = f"Scene: {scene}. {q}" if k == 0 else q
        msgs += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
    return msgs


def lm_conversations(n: int, seed: int, cfg: dict[str, Any], grid: int, max_objects: int, *, min_objects: int = 1,
                     max_repeat: int | None = None, rules: toy.QuestionRules = toy.QuestionRules()
                     ) -> list[list[dict]]:
    """Chats for LM pretraining, from fresh scenes of the world's distribution (``min_objects..max_objects``
    objects, ``max_repeat``, question ``rules``) whose description falls in the train split:

    - ``caption_share`` of them caption a scene: half with the scene given as text (a copy), half without (so the
      LM learns the caption language the align stage asks of it);
    - the rest ask ``turns`` = (min, max) questions of random types about a scene given as text, no question
      twice in a chat (an answer is never copied from an earlier turn)."""
    return lm_chats(np.random.default_rng([seed, 202]), n, cfg, grid, max_objects, min_objects=min_objects,
                    max_repeat=max_repeat, rules=rules)


def lm_chats(rng: np.random.Generator, n: int, cfg: dict[str, Any], grid: int, max_objects: int, *,
             min_objects: int = 1, max_repeat: int | None = None, rules: toy.QuestionRules = toy.QuestionRules()
             ) -> list[list[dict]]:
    """``n`` chats drawn from ``rng`` (``lm_conversations``); ``cfg["types"]``, when given, restricts the
    question types (a curriculum phase), and ``cfg["type_weights"]`` ({type: whole number}, 1 for a type not
    named) asks a type that many times as often. ``cfg["object_tokens"]`` (a share, default 0) writes that share
    of the scenes with one token per object (``toy.object_token_caption``); captions asked for are always in
    words."""
    types = question_types(cfg.get("types"), cfg.get("type_weights"))
    lo, hi = cfg["turns"]
    fused_share = float(cfg.get("object_tokens", 0.0))
    convs: list[list[dict]] = []
    while len(convs) < n:
        objs = toy.sample_scene(rng, grid, max_objects, min_objects=min_objects, max_repeat=max_repeat)
        cap = toy.caption(objs, grid, rules.cell_names)
        if toy.split_of(cap) != "train":
            continue
        # drawn only when asked for: the chats of a config without object tokens stay those it always drew
        scene = toy.object_token_caption(cap) if fused_share and rng.random() < fused_share else cap
        r = rng.random()
        if r < cfg["caption_share"]:
            prompt = toy.CAPTION_PROMPTS[int(rng.integers(len(toy.CAPTION_PROMPTS)))]
            with_scene = float(cfg.get("caption_scene", 0.5))  # the share of caption chats given the scene
            user = prompt if r < cfg["caption_share"] * (1 - with_scene) else f"Scene: {scene}. {prompt}"
            convs.append([{"role": "user", "content": user}, {"role": "assistant", "content": cap}])
            continue
        want = int(rng.integers(lo, hi + 1))
        qas: list[tuple[str, str, str]] = []
        for _ in range(4 * hi):
            qtype = types[int(rng.integers(len(types)))]
            qa = toy.ask(qtype, objs, grid, rng, rules=rules)
            if qa is not None and qa[0] not in {q for _, q, _ in qas}:  # an answer is never copied from a turn
                qas.append((qtype, *qa))
            if len(qas) == want:
                break
        convs.append(scene_messages(objs, grid, qas, rules.cell_names, scene))
    return convs


def question_types(types: list[str] | None, weights: dict[str, int] | None) -> tuple[str, ...]:
    """The types a chat's questions are drawn from, uniformly: ``types`` (all when None), each repeated by its
    whole-number weight (1 when not named). Without weights the tuple, and so every draw, is as it always was."""
    base = tuple(types or toy.QUESTION_TYPES)
    weights = weights or {}
    bad = sorted(set(weights) - set(base))
    if bad:
        raise ValueError(f"toy-lm type_weights: {bad} not among the question types asked ({', '.join(base)})")
    if any(not isinstance(w, int) or w < 1 for w in weights.values()):
        raise ValueError(f"toy-lm type_weights: each weight must be a whole number >= 1, got {weights}")
    return tuple(t for t in base for _ in range(weights.get(t, 1)))


def lm_phases(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The curriculum of an lm config: its ``phases`` (each a dict of ``steps`` and the chat settings it
    changes: ``types``, ``turns``, ``caption_share``), or one phase of all ``steps`` and all types."""
    base = {"types": None, "turns": list(cfg["turns"]), "caption_share": cfg["caption_share"]}
    phases = cfg.get("phases") or [{"steps": cfg["steps"]}]
    unknown = {k for ph in phases for k in ph} - {"steps", *base}
    if unknown:
        raise ValueError(f"toy-lm phases: unknown key(s) {sorted(unknown)}; valid: steps, {', '.join(base)}")
    if sum(ph["steps"] for ph in phases) != cfg["steps"]:
        raise ValueError(f"toy-lm phases: their steps add up to {sum(ph['steps'] for ph in phases)}, "
                         f"not the config's steps {cfg['steps']}")
    return [dict(base, **ph) for ph in phases]


def phase_at(phases: list[dict[str, Any]], step: int) -> dict[str, Any]:
    """The phase (of ``lm_phases``) that step ``step`` (0-based) belongs to."""
    return phases[int(np.searchsorted(np.cumsum([ph["steps"] for ph in phases]), step, side="right"))]


def lm_lr(step: int, cfg: dict[str, Any]) -> float:
    """The learning rate of a toy-lm step: cosine to 5 % after a 5 % warm-up (``schedule: cosine``, shipped), or
    held at the peak after a warm-up of at most 100 steps and cosine to 5 % over the last 10 % of the steps
    (``schedule: held``: a look-up forms after a plateau, and a rate decayed early can leave the run on it)."""
    steps = cfg["steps"]
    schedule = cfg.get("schedule", "cosine")
    if schedule == "cosine":
        return cosine_lr(step, steps, cfg["lr"], max(1, steps // 20))
    if schedule != "held":
        raise ValueError(f"toy-lm schedule {schedule!r}: valid are cosine, held")
    warmup, tail = max(1, min(100, steps // 20)), max(1, steps // 10)
    if step < steps - tail:
        return cfg["lr"] * min(1.0, (step + 1) / warmup)
    p = (step - (steps - tail)) / tail
    return cfg["lr"] * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def world_scenes(data_cfg: dict[str, Any]) -> dict[str, Any]:
    """The scene and question settings of a world's data config, as ``lm_conversations`` takes them."""
    return {"grid": data_cfg["grid"], "max_objects": data_cfg["max_objects"],
            "min_objects": data_cfg.get("min_objects", 1), "max_repeat": data_cfg.get("max_repeat"),
            "rules": toy.QuestionRules(data_cfg.get("cell_questions", "occupied"),
                                       data_cfg.get("relations", "balanced"), data_cfg.get("cell_names", "words"))}


def lm_batch(tok, convs: list[list[dict]], other_weight: float = 0.0) -> dict[str, "torch.Tensor"]:
    """Right-padded ids, mask, labels (every real token) and per-token loss ``weights``: 1 on assistant tokens,
    ``other_weight`` on the rest (system, scene text, questions), 0 on padding."""
    import torch

    enc = tok.apply_chat_template(convs, tokenize=True, return_dict=True, padding=True, return_tensors="pt",
                                  return_assistant_tokens_mask=True)
    ids, att = enc["input_ids"], enc["attention_mask"]
    answer = torch.as_tensor(enc["assistant_masks"]).bool()
    weights = torch.where(answer, 1.0, other_weight) * att
    return {"input_ids": ids, "attention_mask": att, "labels": ids.masked_fill(weights == 0, -100), "weights": weights}


def lm_loss(model, batch: dict[str, "torch.Tensor"]) -> "torch.Tensor":
    """Next-token cross-entropy weighted per target token (``lm_batch``'s weights), normalised by the weights."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    w = batch["weights"][:, 1:]
    return (nll * w).sum() / w.sum()


def train_lm(tok, out_dir: Path, cfg: dict[str, Any], seed: int, data_cfg: dict[str, Any], update: Update,
             ckpt: StepCheckpoint | None = None) -> dict:
    """Pretraining of a tiny Qwen2 on toy chats (no images); saves model + tokenizer + generation config.

    Answer tokens carry full loss and every other token ``other_token_weight`` (0.3 in the shipped preset): the
    answers teach reading a scene out of the context; predicting the scene text's fixed layout (which cell comes
    next) teaches the LM where it is in a description, which the look-ups build on. Measured with 6-10 distinct
    questions per scene: colour_at_position 0.62 after 1 000 steps with weight 0.3, while answer-only loss kept
    one constant colour (0.10 after 750 steps; 0.18 after 6 000 steps of 1-4 questions). ``ckpt``: resume from
    its last checkpoint and write new ones."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(vocab_size=len(tok), bos_token_id=None, eos_token_id=im_end,
                         pad_token_id=tok.pad_token_id, **cfg["arch"])
    model = Qwen2ForCausalLM(config)
    steps, batch = cfg["steps"], cfg["batch"]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01, betas=(0.9, 0.95))
    ckpt = ckpt or StepCheckpoint(None, 1, "")
    start, losses, rng_state = ckpt.restore(model, opt)
    # A config with phases draws each step's chats as it goes (its rng state is checkpointed); one without draws
    # them all first, as the shipped weights were made.
    phased = "phases" in cfg
    rng = np.random.default_rng([seed, 202])
    if rng_state is not None:
        rng.bit_generator.state = json.loads(rng_state)
    convs = None if phased else lm_conversations(steps * batch, seed, cfg, **world_scenes(data_cfg))
    phases = lm_phases(cfg)
    model.train()
    for step in range(start, steps):
        if phased:
            chats = lm_chats(rng, batch, phase_at(phases, step), **world_scenes(data_cfg))
        else:
            chats = convs[step * batch:(step + 1) * batch]
        b = lm_batch(tok, chats, cfg["other_token_weight"])
        for g in opt.param_groups:
            g["lr"] = lm_lr(step, cfg)
        losses.append(_step(lm_loss(model, b), model, opt))
        update(step + 1, f"loss {np.mean(losses[-10:]):.3f}")
        ckpt.save(step + 1, steps, model, opt, losses, json.dumps(rng.bit_generator.state) if phased else None)
    model.eval()
    model.generation_config = GenerationConfig(eos_token_id=im_end, pad_token_id=tok.pad_token_id,
                                               do_sample=False, max_new_tokens=64)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return {"params": sum(p.numel() for p in model.parameters()),
            "train_loss_first": round(float(np.mean(losses[:10])), 4),
            "train_loss_last": round(float(np.mean(losses[-10:])), 4), **_resumed(start)}


# ---- toy-lm, second stage: cells written as one token ------------------------------------------------------------
def add_object_tokens(model, tok, seed: int) -> None:
    """Adds ``toy.OBJECT_TOKENS`` (30, one per colour and shape) to ``tok`` and ``model``'s vocabulary. Each new
    input embedding starts as the sum of its colour's and its shape's word embeddings (the cell's two words in
    one vector, as an image token gives it); the new output rows are transformers' mean resizing, drawn from
    ``seed``. The tokens are added as special tokens without ``lstrip``, so the space before one stays its own
    token ('north: <obj_red_circle>' is 'north', ':', ' ', '<obj_red_circle>'), as it was when the shipped
    weights were trained, and ``decode(skip_special_tokens=True)`` drops them (answers never contain them)."""
    import torch

    tok.add_tokens(list(toy.OBJECT_TOKENS), special_tokens=True)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left as it was
        torch.manual_seed(seed)
        model.resize_token_embeddings(len(tok))
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        for colour in toy.COLOURS_LIST:
            for shape in toy.SHAPES:
                word = [tok.encode(" " + w)[-1] for w in (colour, shape)]
                emb[tok.convert_tokens_to_ids(toy.object_token(colour, shape))] = emb[word[0]] + emb[word[1]]


def train_lm_objects(base_dir: Path, out_dir: Path, cfg: dict[str, Any], seed: int, data_cfg: dict[str, Any],
                     update: Update, ckpt: StepCheckpoint | None = None) -> dict:
    """toy-lm's second stage: the LM of the first (``base_dir``, saved with its tokenizer) learns to read a cell
    written as one token. ``cfg`` (the lm config's ``objects``): ``steps`` with a fresh AdamW at ``lr`` (held
    schedule: warm-up, then cosine over the last tenth), ``object_tokens`` = the share of scenes written with
    ``toy.OBJECT_TOKENS``, the others in words, and the chat settings of ``lm_chats`` (``turns``,
    ``caption_share``; all question types). Why: an image token is one vector per cell, and a toy-lm that read
    cells only as two words answered shape per cell at 0.26-0.33 in the default VLM; one fine-tuned this way (a
    pilot of 1 000 steps) at 0.38-0.46 over the same three seeds (docs/toyworld.md). Saves model + tokenizer +
    generation config to ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    add_object_tokens(model, tok, seed)
    stats = fine_tune_lm(model, tok, out_dir, cfg, np.random.default_rng([seed, 303]), data_cfg, update, ckpt)
    return {**stats, "vocab_added": len(toy.OBJECT_TOKENS)}


def train_lm_focus(base_dir: Path, out_dir: Path, cfg: dict[str, Any], seed: int, data_cfg: dict[str, Any],
                   update: Update, ckpt: StepCheckpoint | None = None) -> dict:
    """toy-lm's third stage: the LM of the second (``base_dir``) trains on, asking some question types more
    often (``cfg["type_weights"]``); otherwise as ``train_lm_objects`` (the same chat settings, ``object_tokens``
    included, and schedule). Why: a relation question chains two look-ups (where the named object is, then what
    its neighbour holds), and the shipped toy-lm answered it from text at 0.70 against 1.00 on every single
    look-up; the default VLM on top of it at 0.55-0.63. Saves model + tokenizer + generation config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    return fine_tune_lm(model, tok, out_dir, cfg, np.random.default_rng([seed, 404]), data_cfg, update, ckpt)


def fine_tune_lm(model, tok, out_dir: Path, cfg: dict[str, Any], rng: np.random.Generator, data_cfg: dict[str, Any],
                 update: Update, ckpt: StepCheckpoint | None = None) -> dict:
    """The loop of toy-lm's later stages: ``cfg["steps"]`` steps of ``cfg["batch"]`` fresh chats drawn from
    ``rng`` (``lm_chats`` with the stage's ``turns``, ``caption_share``, ``caption_scene``, ``object_tokens``,
    ``type_weights``), a fresh AdamW at ``cfg["lr"]`` on the held schedule, loss weight ``other_token_weight`` off
    the answers. Resumes from ``ckpt`` (the rng state is checkpointed); saves model + tokenizer to ``out_dir``."""
    import torch

    steps, batch = cfg["steps"], cfg["batch"]
    sched = {"steps": steps, "lr": cfg["lr"], "schedule": "held"}
    chat_cfg = {"types": None, "turns": list(cfg["turns"]), "caption_share": cfg["caption_share"],
                "object_tokens": cfg["object_tokens"], "caption_scene": cfg.get("caption_scene", 0.5),
                "type_weights": cfg.get("type_weights")}
    question_types(None, chat_cfg["type_weights"])  # a bad weight fails before any step
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01, betas=(0.9, 0.95))
    ckpt = ckpt or StepCheckpoint(None, 1, "")
    start, losses, rng_state = ckpt.restore(model, opt)
    if rng_state is not None:
        rng.bit_generator.state = json.loads(rng_state)
    model.train()
    for step in range(start, steps):
        b = lm_batch(tok, lm_chats(rng, batch, chat_cfg, **world_scenes(data_cfg)), cfg["other_token_weight"])
        for g in opt.param_groups:
            g["lr"] = lm_lr(step, sched)
        losses.append(_step(lm_loss(model, b), model, opt))
        update(step + 1, f"loss {np.mean(losses[-10:]):.3f}")
        ckpt.save(step + 1, steps, model, opt, losses, json.dumps(rng.bit_generator.state))
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return {"params": sum(p.numel() for p in model.parameters()), "steps": steps,
            "train_loss_first": round(float(np.mean(losses[:10])), 4),
            "train_loss_last": round(float(np.mean(losses[-10:])), 4), **_resumed(start)}
