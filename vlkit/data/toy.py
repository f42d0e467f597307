"""The shapes world: a procedural dataset in LLaVA JSON format.

Each image shows 1..``max_objects`` coloured shapes on a plain background, one per cell of a ``grid`` x ``grid``
grid. Every scene is drawn from its own ``numpy`` generator seeded by ``(seed, split, index)``, so any sample can
be regenerated alone and the output does not depend on worker order. Scenes are assigned to splits by a hash of
their canonical description, so no description occurs in two splits.

Output layout (``out_dir``)::

    images/<split>/<id>.png        RGB PNG, image_size x image_size
    align_<split>.json             captions, LLaVA pretrain format
    instruct_<split>.json          questions with short canonical answers, LLaVA instruct format
    scenes_<split>.json            per-image annotations: objects with shape/colour/row/col
    meta.json                      generation parameters and the world's vocabulary

Image paths inside the JSON files are relative to ``out_dir / "images"``. The scenes' vocabulary and sampling
live in ``toy_scenes.py``, the questions and the position-blind reader in ``toy_questions.py``; their names are
importable from here.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

# the scenes' and the questions' names stay importable from here (vlkit.data.toy is the world's one entry point)
from vlkit.data.toy_questions import ask, position_blind_accuracy, position_blind_answers  # noqa: F401
from vlkit.data.toy_scenes import (BACKGROUND, CAPTION_PROMPTS, CELL_NAMES, COLOURS, COLOURS_LIST,  # noqa: F401
                                   COMPASS, FORMAT_VERSION, NOTHING, OBJECT_TOKENS, QUESTION_TYPES, RECORDS_VERSION,
                                   RELATIONS, SHAPES, SPATIAL_TYPES, SPLITS, Obj, QuestionRules, _rng, article,
                                   caption, clip_caption, object_token, object_token_caption, plural, position_name,
                                   sample_scene, split_of)


# ---- drawing ------------------------------------------------------------------------------------------------
def render(objs: list[Obj], image_size: int, grid: int):
    """A PIL RGB image of the scene."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = image_size / grid
    for o in objs:
        cx = (o.col + 0.5) * cell + o.dx
        cy = (o.row + 0.5) * cell + o.dy
        r = o.size * cell / 2
        fill = COLOURS[o.colour]
        box = [cx - r, cy - r, cx + r, cy + r]
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            s = r * 0.85
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
        elif o.shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        elif o.shape == "cross":
            t = r * 0.35
            draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
            draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
        else:
            raise ValueError(f"unknown shape {o.shape!r}")
    return img


def _render_batch(args: tuple[list[tuple[str, list[Obj]]], int, int]) -> int:
    jobs, image_size, grid = args
    for path, objs in jobs:
        render(objs, image_size, grid).save(path, format="PNG", optimize=False, compress_level=6)
    return len(jobs)


# ---- generation ---------------------------------------------------------------------------------------------
def _scene_for(seed: int, split: str, index: int, grid: int, max_objects: int, size_jitter: bool,
               qtype: str | None, min_objects: int = 1, rules: QuestionRules = QuestionRules(),
               max_repeat: int | None = None) -> tuple[list[Obj], np.random.Generator, tuple[str, str] | None]:
    """The scene at (split, index): rejection-sampled until its description hashes into ``split`` and, for a
    fixed ``qtype``, until that question applies. The object count is drawn first, so every split has the same
    distribution of object counts."""
    rng = _rng(seed, split, index)
    n = int(rng.integers(min_objects, max_objects + 1))
    # held-out balanced relation questions alternate between an object answer and "nothing"
    want = (n > 1 and (index // len(QUESTION_TYPES)) % 3 != 0
            if qtype == "relation" and rules.relations == "balanced" else None)
    for _ in range(100_000):
        objs = sample_scene(rng, grid, max_objects, size_jitter, n=n, max_repeat=max_repeat)
        if split_of(caption(objs, grid, rules.cell_names)) != split:
            continue
        if qtype is None:
            return objs, rng, None
        qa = ask(qtype, objs, grid, rng, want_object=want, rules=rules)
        if qa is not None:
            return objs, rng, qa
    raise RuntimeError(f"could not sample a {split} scene for {qtype}; the grid is too small for this split")


def _instruct_train(objs: list[Obj], grid: int, rng: np.random.Generator, multi_share: float,
                    rules: QuestionRules = QuestionRules()):
    """1 turn, or 2-3 turns of distinct question types."""
    n_turns = int(rng.integers(2, 4)) if rng.random() < multi_share else 1
    turns: list[tuple[str, str, str]] = []
    order = rng.permutation(len(QUESTION_TYPES))
    for i in order:
        qa = ask(QUESTION_TYPES[i], objs, grid, rng, rules=rules)
        if qa is not None:
            turns.append((QUESTION_TYPES[i], *qa))
        if len(turns) == n_turns:
            break
    return turns


def _references(qtype: str, question: str, answer: str, objs: list[Obj], grid: int, rules: QuestionRules,
                train_answers: dict[str, Counter]) -> dict[str, float]:
    """What three references score on one held-out question: ``blind`` (the type's most frequent training answer),
    ``uniform`` (a uniform guess among the type's distinct training answers), ``position_blind`` (the
    position-blind reader's expected accuracy)."""
    seen = train_answers.get(qtype) or Counter()
    top = seen.most_common(1)[0][0] if seen else None
    reader = position_blind_accuracy(position_blind_answers(qtype, question, answer, objs, grid, rules), answer)
    return {"blind": float(answer == top), "uniform": 1 / len(seen) if seen else 0.0,
            "position_blind": float(reader)}


def _conversation(turns: list[tuple[str, str, str]]) -> list[dict[str, str]]:
    conv = []
    for k, (_, q, a) in enumerate(turns):
        conv.append({"from": "human", "value": f"<image>\n{q}" if k == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return conv


def generate_toy_data(
    out_dir: str | os.PathLike,
    *,
    n_train: int = 20000,
    n_val: int = 1000,
    n_test: int = 1000,
    image_size: int = 64,
    grid: int = 3,
    max_objects: int = 4,
    seed: int = 0,
    size_jitter: bool = True,
    multi_turn_share: float = 0.5,
    min_objects: int = 1,
    max_repeat: int | None = None,
    cell_questions: str = "occupied",
    relations: str = "balanced",
    cell_names: str = "words",
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Path]:
    """Write the shapes world into ``out_dir``; returns the written files by name.

    ``progress(done, total)`` is called as images are written. Keys of the result: ``images``, ``meta``,
    ``align_<split>``, ``instruct_<split>``, ``scenes_<split>``. Scenes hold ``min_objects..max_objects``
    objects, no colour or shape more than ``max_repeat`` times; ``cell_questions`` and ``relations`` are the ``QuestionRules``. Every val/test question carries
    ``spatial`` (its type needs positions) and ``references``: what the blind answer (the type's most frequent
    training answer), a uniform guess among the type's training answers and the position-blind reader score on
    it.
    """
    if not 1 <= min_objects <= max_objects <= grid * grid:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {grid * grid} for a {grid}x{grid} grid, "
                         f"got min_objects={min_objects}, max_objects={max_objects}")
    rules = QuestionRules(cell_questions, relations, cell_names)
    world = dict(seed=seed, grid=grid, max_objects=max_objects, size_jitter=size_jitter, min_objects=min_objects,
                 rules=rules, max_repeat=max_repeat, multi_turn_share=multi_turn_share)
    train_answers: dict[str, Counter] = {}  # filled by the train split, read by the held-out references
    out = Path(out_dir)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    paths: dict[str, Path] = {"images": out / "images", "meta": out / "meta.json"}
    jobs: list[tuple[str, list[Obj]]] = []
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        files = {"align": [], "instruct": [], "scenes": []}
        for i in range(counts[split]):
            for name, rec in zip(files, _sample_records(split, i, world, train_answers)):
                files[name].append(rec)
            jobs.append((str(out / "images" / rec["image"]), [Obj(o["shape"], o["colour"], o["row"], o["col"],
                                                                   o["size"], o["dx"], o["dy"]) for o in rec["objects"]]))
            for o in rec["objects"]:  # the jitter only draws the image
                del o["dx"], o["dy"]
        for name, records in files.items():
            paths[f"{name}_{split}"] = out / f"{name}_{split}.json"
            paths[f"{name}_{split}"].write_text(json.dumps(records, indent=None, separators=(",", ":")))
    meta = {
        "format_version": FORMAT_VERSION, "seed": seed, "image_size": image_size, "grid": grid,
        "min_objects": min_objects, "max_objects": max_objects, "max_repeat": max_repeat, "size_jitter": size_jitter,
        "multi_turn_share": multi_turn_share, "cell_questions": cell_questions, "relations": relations,
        "cell_names": cell_names, "spatial_types": list(SPATIAL_TYPES),
        "counts": counts, "shapes": list(SHAPES), "colours": {k: list(v) for k, v in COLOURS.items()},
        "background": list(BACKGROUND), "question_types": list(QUESTION_TYPES),
        "positions": [position_name(r, c, grid, cell_names) for r in range(grid) for c in range(grid)],
        "caption_prompts": list(CAPTION_PROMPTS), "images_root": "images",
    }
    paths["meta"].write_text(json.dumps(meta, indent=2))
    _render_all(jobs, image_size, grid, workers, progress)
    return paths


def _sample_records(split: str, i: int, world: dict, train_answers: dict[str, Counter]) -> tuple[dict, dict, dict]:
    """The align, instruct and scene records of sample ``i`` of ``split`` (the scene record's objects keep their
    pixel jitter ``dx``/``dy`` for drawing). Train questions add to ``train_answers``; held-out ones carry their
    references."""
    grid, rules = world["grid"], world["rules"]
    sid = f"{split}_{i:06d}"
    image = f"{split}/{sid}.png"
    qtype = None if split == "train" else QUESTION_TYPES[i % len(QUESTION_TYPES)]
    objs, rng, qa = _scene_for(world["seed"], split, i, grid, world["max_objects"], world["size_jitter"], qtype,
                               world["min_objects"], rules, world["max_repeat"])
    cap = caption(objs, grid, rules.cell_names)
    prompt = CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))]
    align = {"id": sid, "image": image, "conversations": [
        {"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": cap}]}
    if split == "train":
        turns = _instruct_train(objs, grid, rng, world["multi_turn_share"], rules)
        for t, _, a in turns:
            train_answers.setdefault(t, Counter())[a] += 1
    else:
        turns = [(qtype, *qa)]
    rec = {"id": sid, "image": image, "conversations": _conversation(turns)}
    if len(turns) == 1:
        rec["question_type"] = turns[0][0]
        rec["answer"] = turns[0][2]
    else:
        rec["question_type"] = "multi"
        rec["question_types"] = [t[0] for t in turns]
    if split != "train":
        rec["spatial"] = qtype in SPATIAL_TYPES
        rec["references"] = _references(qtype, *qa, objs, grid, rules, train_answers)
    scene = {"id": sid, "image": image, "caption": cap, "objects": [
        {"shape": o.shape, "colour": o.colour, "row": o.row, "col": o.col,
         "position": position_name(o.row, o.col, grid, rules.cell_names), "size": o.size, "dx": o.dx, "dy": o.dy}
        for o in objs]}
    return align, rec, scene


def _render_all(jobs: list[tuple[str, list[Obj]]], image_size: int, grid: int, workers: int | None,
                progress: Callable[[int, int], None] | None) -> None:
    """Draw every image, in chunks, in worker processes when there are many."""
    total = len(jobs)
    chunk = 250
    batches = [(jobs[k:k + chunk], image_size, grid) for k in range(0, total, chunk)]
    workers = workers if workers is not None else min(os.cpu_count() or 1, 4)
    done = 0
    if workers > 1 and total > 2000:
        with ProcessPoolExecutor(workers) as pool:
            for n in pool.map(_render_batch, batches):
                done += n
                if progress:
                    progress(done, total)
    else:
        for b in batches:
            done += _render_batch(b)
            if progress:
                progress(done, total)


def load_scenes(data_dir: str | os.PathLike, split: str) -> list[dict]:
    """The per-image annotations of one split."""
    return json.loads((Path(data_dir) / f"scenes_{split}.json").read_text())
