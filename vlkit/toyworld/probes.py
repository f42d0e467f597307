"""Quality probes of the toy world's models: toy-lm answering from scene text, toy-clip retrieval and linear probes
on frozen toy-clip features (per image and per object). Their results go into the shipped manifest's report."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from vlkit.data import toy
from vlkit.toyworld.models import clip_text, load_images, normalize

# ---- quality probes -------------------------------------------------------------------------------------------
def val_lm_convs(data_dir: Path, object_tokens: bool = False) -> tuple[list[list[dict]], list[str], list[str]]:
    """The val questions as single-turn chats with the scene given as text (each object as its one token with
    ``object_tokens``), their types, and the bare questions."""
    scenes = {s["id"]: s for s in toy.load_scenes(data_dir, "val")}
    convs, types, questions = [], [], []
    for rec in json.loads((data_dir / "instruct_val.json").read_text()):
        q = rec["conversations"][0]["value"].replace("<image>\n", "")
        scene = scenes[rec["id"]]["caption"]
        scene = toy.object_token_caption(scene) if object_tokens else scene
        convs.append([{"role": "user", "content": f"Scene: {scene}. {q}"},
                      {"role": "assistant", "content": rec["answer"]}])
        types.append(rec["question_type"])
        questions.append(q)
    return convs, types, questions


def _lm_answers(lm_dir: Path, convs: list[list[dict]], batch: int = 50) -> dict[str, Any]:
    """``lm_answers`` of the saved LM in ``lm_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm_dir)
    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    return lm_answers(model, tok, convs, batch)


def lm_answers(model, tok, convs: list[list[dict]], batch: int = 50) -> dict[str, Any]:
    """Teacher-forced pass over single-turn chats: per chat whether every answer token is the argmax, plus the
    summed NLL and token counts of all tokens and of answer tokens. Runs on the model's device."""
    import torch

    device = next(model.parameters()).device
    out = {"hits": [], "nll_all": 0.0, "n_all": 0, "nll_ans": 0.0, "n_ans": 0}
    with torch.no_grad():
        for k in range(0, len(convs), batch):
            enc = tok.apply_chat_template(convs[k:k + batch], tokenize=True, return_dict=True, padding=True,
                                          return_tensors="pt", return_assistant_tokens_mask=True)
            ids, att = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            ans = torch.as_tensor(enc["assistant_masks"]).bool().to(device)
            logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
            target, valid, ans_t = ids[:, 1:], att[:, 1:].bool(), ans[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            out["nll_all"] += nll[valid].sum().item()
            out["n_all"] += valid.sum().item()
            out["nll_ans"] += nll[ans_t].sum().item()
            out["n_ans"] += ans_t.sum().item()
            hit = (logits.argmax(-1) == target) | ~ans_t
            out["hits"] += hit.all(dim=1).tolist()
    return out


def probe_lm(lm_dir: Path, data_dir: Path, batch: int = 50) -> dict[str, Any]:
    """Held-out perplexity (all tokens of val chat text), answer perplexity, and teacher-forced answer accuracy
    (every answer token is the argmax) by question type and per question, given the scene as text."""
    convs, types, _ = val_lm_convs(data_dir)
    r = _lm_answers(lm_dir, convs, batch)
    acc = _by_type(types, r["hits"])
    return {"val_perplexity": round(math.exp(r["nll_all"] / r["n_all"]), 3),
            "val_answer_perplexity": round(math.exp(r["nll_ans"] / r["n_ans"]), 3),
            "val_answer_accuracy_from_text": round(float(np.mean(r["hits"])), 3),
            "val_answer_accuracy_by_type": acc,
            # per val question, in file order ("1" right): the first-use data carries it as a reference
            "val_hits_from_text": "".join("1" if h else "0" for h in r["hits"]),
            **_from_object_tokens(lm_dir, data_dir, batch)}


def _from_object_tokens(lm_dir: Path, data_dir: Path, batch: int) -> dict[str, Any]:
    """The answer accuracy with each object of the scene written as its one token (an LM whose vocabulary has
    ``toy.OBJECT_TOKENS``, i.e. after toy-lm's second stage; nothing for one without)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm_dir)
    if tok.convert_tokens_to_ids(toy.OBJECT_TOKENS[0]) in (None, tok.unk_token_id):
        return {}
    convs, types, _ = val_lm_convs(data_dir, object_tokens=True)
    hits = _lm_answers(lm_dir, convs, batch)["hits"]
    return {"val_answer_accuracy_from_object_tokens": round(float(np.mean(hits)), 3),
            "val_answer_accuracy_by_type_from_object_tokens": _by_type(types, hits)}


def _by_type(types: list[str], hits: list[bool]) -> dict[str, float]:
    """Accuracy per question type, sorted by type, to 3 decimals."""
    by: dict[str, list[bool]] = {}
    for t, h in zip(types, hits):
        by.setdefault(t, []).append(h)
    return {t: round(float(np.mean(v)), 3) for t, v in sorted(by.items())}


def lm_breakdown(lm_dir: Path, data_dir: Path) -> dict[str, dict[str, tuple[float, int]]]:
    """``probe_lm``'s accuracy from text split finer, to see what limits toy-lm: for each question type,
    (accuracy, n) by the cell asked about (colour/shape at a position), by the answer (position of an object,
    existence) or by whether the answer is an object or "nothing" (relation)."""
    convs, types, questions = val_lm_convs(data_dir)
    hits = _lm_answers(lm_dir, convs)["hits"]
    groups: dict[str, dict[str, list[bool]]] = {}
    for conv, t, question, h in zip(convs, types, questions, hits):
        answer = conv[1]["content"]
        if t in ("colour_at_position", "shape_at_position"):
            key = question.split(" in the ", 1)[1].rstrip("?")
        elif t == "relation":
            key = "nothing" if answer == toy.NOTHING else "an object"
        elif t in ("position_of_object", "existence"):
            key = answer
        else:
            key = "all"
        groups.setdefault(t, {}).setdefault(key, []).append(h)
    return {t: {k: (round(float(np.mean(v)), 3), len(v)) for k, v in sorted(g.items())}
            for t, g in sorted(groups.items())}


def probe_retrieval(clip_dir: Path, data_dir: Path, tok, batch: int = 100) -> float:
    """Image->caption top-1 among the captions of its batch of ``batch`` val images (a caption identical to the
    right one counts as right)."""
    import torch
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    scenes = toy.load_scenes(data_dir, "val")
    images = load_images(data_dir, scenes)
    caps = [toy.clip_caption([toy.Obj(o["shape"], o["colour"], 0, 0, 0, 0, 0) for o in s["objects"]])
            for s in scenes]
    hits = []
    with torch.no_grad():
        for k in range(0, len(scenes) - batch + 1, batch):
            img = model.get_image_features(pixel_values=normalize(images[k:k + batch]))
            txt = model.get_text_features(**clip_text(tok, caps[k:k + batch]))
            img = getattr(img, "pooler_output", img)
            txt = getattr(txt, "pooler_output", txt)
            pred = (img @ txt.T).argmax(-1).tolist()
            hits += [caps[k + p] == caps[k + i] for i, p in enumerate(pred)]
    return round(float(np.mean(hits)), 3) if hits else float("nan")


def clip_features(clip_dir: Path, images_u8, grid: int = 3, batch: int = 250) -> dict[str, "torch.Tensor"]:
    """Frozen toy-clip features: pooled CLS, patch tokens averaged per grid cell (concatenated), all patches
    averaged. Patches are assigned to the cell that holds their centre."""
    import torch
    from transformers import CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(clip_dir).eval()
    vc = model.config
    side = vc.image_size // vc.patch_size
    centres = (torch.arange(side) * vc.patch_size + vc.patch_size / 2) * grid / vc.image_size
    cell_of = centres.floor().long()  # [side] patch row/col -> cell row/col
    assign = torch.zeros(grid * grid, side * side)
    for r in range(side):
        for c in range(side):
            assign[cell_of[r] * grid + cell_of[c], r * side + c] = 1.0
    assign = assign / assign.sum(1, keepdim=True)
    feats: dict[str, list] = {"cls": [], "patch_cells": [], "patch_mean": [], "patch_grid": []}
    with torch.no_grad():
        for k in range(0, len(images_u8), batch):
            out = model(pixel_values=normalize(images_u8[k:k + batch]))
            patches = out.last_hidden_state[:, 1:]  # [B, side*side, D]
            feats["cls"].append(out.pooler_output)  # [B, D]
            feats["patch_cells"].append(torch.einsum("cp,bpd->bcd", assign, patches).flatten(1))  # [B, cells*D]
            feats["patch_mean"].append(patches.mean(1))  # [B, D]
            feats["patch_grid"].append(patches.reshape(len(patches), side, side, -1))  # [B, side, side, D]
    return {k: torch.cat(v) for k, v in feats.items()}


def _fit_linear(x_train, y_train, x_test, out_dim: int, loss_fn, epochs: int, lr: float, weight_decay: float,
                seed: int):
    """A linear map fitted full-batch with Adam on standardised features; returns its logits on ``x_test``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    xtr, xte = (x_train - mu) / sd, (x_test - mu) / sd
    lin = torch.nn.Linear(xtr.shape[1], out_dim)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.01)
        lin.bias.zero_()
    opt = torch.optim.Adam(lin.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        opt.zero_grad()
        loss_fn(lin(xtr), y_train).backward()
        opt.step()
    with torch.no_grad():
        return lin(xte)


def softmax_probe(x_train, y_train, x_test, y_test, n_classes: int, epochs: int = 300, lr: float = 0.01,
                  weight_decay: float = 1e-3, seed: int = 0) -> float:
    """Multi-class linear probe (softmax regression, full batch Adam) on standardised features: test accuracy."""
    import torch

    logits = _fit_linear(x_train, y_train, x_test, n_classes, torch.nn.functional.cross_entropy, epochs, lr,
                         weight_decay, seed)
    return round((logits.argmax(-1) == y_test).float().mean().item(), 3)


def _object_features(scenes: list[dict], feats: dict, grid: int, image_size: int, patch: int):
    """Per object: its cell's mean patch feature and the 3x3 patch window around its cell centre; labels."""
    import torch

    side = image_size // patch
    cells, windows, shapes, colours = [], [], [], []
    for i, s in enumerate(scenes):
        for o in s["objects"]:
            cells.append(feats["patch_cells"][i].view(grid * grid, -1)[o["row"] * grid + o["col"]])
            r, c = (min(max(int((v + 0.5) * image_size / grid / patch), 1), side - 2) for v in (o["row"], o["col"]))
            windows.append(feats["patch_grid"][i, r - 1:r + 2, c - 1:c + 2].flatten())
            shapes.append(toy.SHAPES.index(o["shape"]))
            colours.append(toy.COLOURS_LIST.index(o["colour"]))
    return ({"cell_mean": torch.stack(cells), "patch_window_3x3": torch.stack(windows)},
            {"shape": torch.tensor(shapes), "colour": torch.tensor(colours)})


def logistic_probe(x_train, y_train, x_test, y_test, epochs: int = 300, lr: float = 0.01,
                   weight_decay: float = 1e-4, seed: int = 0) -> dict[str, float]:
    """Multi-label linear probe (one logistic regression per label, full batch Adam) on standardised features:
    exact-set accuracy and per-label accuracy on the test set."""
    import torch

    pred = _fit_linear(x_train, y_train, x_test, y_train.shape[1],
                       torch.nn.functional.binary_cross_entropy_with_logits, epochs, lr, weight_decay, seed) > 0
    truth = y_test > 0.5
    return {"exact": round((pred == truth).all(1).float().mean().item(), 3),
            "per_label": round((pred == truth).float().mean().item(), 3)}


def _majority(y_train, y_test) -> dict[str, float]:
    """Baselines: the most common label set of the train set, and each label's majority value."""
    import torch

    sets, counts = torch.unique(y_train, dim=0, return_counts=True)
    top = sets[counts.argmax()]
    per = (y_train.mean(0) > 0.5).float()
    return {"exact": round((y_test == top).all(1).float().mean().item(), 3),
            "per_label": round((y_test == per).float().mean().item(), 3)}


def _labels(scenes: list[dict], grid: int) -> dict[str, "torch.Tensor"]:
    import torch

    pos = torch.zeros(len(scenes), grid * grid)
    col = torch.zeros(len(scenes), len(toy.COLOURS_LIST))
    shp = torch.zeros(len(scenes), len(toy.SHAPES))
    for i, s in enumerate(scenes):
        for o in s["objects"]:
            pos[i, o["row"] * grid + o["col"]] = 1
            col[i, toy.COLOURS_LIST.index(o["colour"])] = 1
            shp[i, toy.SHAPES.index(o["shape"])] = 1
    return {"position": pos, "colour": col, "shape": shp}


def probe_features(clip_dir: Path, data_dir: Path, n_train: int, epochs: int, seed: int) -> dict[str, Any]:
    """Linear probes on frozen toy-clip features (last layer; fit on train images, scored on val).

    Per image (multi-label): which cells are occupied, which colours and which shapes are present, from the pooled
    CLS, from patch tokens averaged per grid cell (concatenated), and from all patches averaged. Per object
    (multi-class): its shape and colour from its cell's mean patch token and from the 3x3 patch window around it.
    """
    meta = json.loads((data_dir / "meta.json").read_text())
    grid = meta["grid"]
    train = toy.load_scenes(data_dir, "train")[:n_train]
    val = toy.load_scenes(data_dir, "val")
    f_tr = clip_features(clip_dir, load_images(data_dir, train), grid)
    f_te = clip_features(clip_dir, load_images(data_dir, val), grid)
    y_tr, y_te = _labels(train, grid), _labels(val, grid)
    result: dict[str, Any] = {"n_train": len(train), "n_test": len(val), "metric": "exact-set accuracy (per-label)"}
    for target in y_tr:
        row = {"majority": _majority(y_tr[target], y_te[target])}
        for inp in ("cls", "patch_cells", "patch_mean"):
            row[inp] = logistic_probe(f_tr[inp], y_tr[target], f_te[inp], y_te[target], epochs=epochs, seed=seed)
        result[target] = row
    patch = json.loads((Path(clip_dir) / "config.json").read_text())["vision_config"]["patch_size"]
    x_tr, o_tr = _object_features(train, f_tr, grid, meta["image_size"], patch)
    x_te, o_te = _object_features(val, f_te, grid, meta["image_size"], patch)
    per_object: dict[str, Any] = {"metric": "accuracy", "n_train": len(o_tr["shape"]), "n_test": len(o_te["shape"])}
    for target, n_classes in (("shape", len(toy.SHAPES)), ("colour", len(toy.COLOURS_LIST))):
        majority = int(o_tr[target].bincount(minlength=n_classes).argmax())
        row = {"majority": round((o_te[target] == majority).float().mean().item(), 3)}
        for inp in x_tr:
            row[inp] = softmax_probe(x_tr[inp], o_tr[target], x_te[inp], o_te[target], n_classes,
                                     epochs=epochs, seed=seed)
        per_object[target] = row
    # occupancy: one probe shared by all cells, from each cell's mean patch token (is there an object?)
    cells_tr, occ_tr = _cell_features(f_tr, y_tr["position"], grid)
    cells_te, occ_te = _cell_features(f_te, y_te["position"], grid)
    per_object["occupancy"] = {
        "majority": round(max(occ_te.float().mean().item(), 1 - occ_te.float().mean().item()), 3),
        "cell_mean": softmax_probe(cells_tr, occ_tr, cells_te, occ_te, 2, epochs=epochs, seed=seed)}
    result["per_object"] = per_object
    return result


def _cell_features(feats: dict, occupied: "torch.Tensor", grid: int):
    """Every cell's mean patch feature ``[N*cells, D]`` and whether an object occupies it ``[N*cells]``."""
    cells = feats["patch_cells"].view(len(occupied) * grid * grid, -1)
    return cells, occupied.flatten().long()


def add_lm_reference(data_dir: Path, report: dict[str, Any]) -> bool:
    """Give each val question of ``data_dir`` the reference ``toy_lm_from_text`` (1 when toy-lm, given the scene as
    text, answered it; from the weights' report) so that every evaluation shows it beside its own accuracy, on the
    same questions. False (and nothing written) when the report has no per-question hits for this val set."""
    hits = (report.get("toy_lm") or {}).get("val_hits_from_text")
    path = Path(data_dir) / "instruct_val.json"
    val = json.loads(path.read_text())
    if not hits or len(hits) != len(val):
        return False
    for rec, h in zip(val, hits):
        rec["references"]["toy_lm_from_text"] = float(h == "1")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(val, indent=None, separators=(",", ":")))
    tmp.replace(path)
    return True


def answer_baselines(data_dir: Path, n_eval: int = 1000) -> dict[str, dict[str, Any]]:
    """The references of the first ``n_eval`` val questions (the default recipe's evaluation set), per question
    type and over all: the means of the ``references`` each question carries (``blind``, ``uniform``,
    ``position_blind``, see ``vlkit.data.toy.generate_toy_data``; ``toy_lm_from_text``, see ``add_lm_reference``),
    the count ``n`` and whether the type is
    ``spatial``."""
    from vlkit.data.references import reference_report

    val = json.loads((Path(data_dir) / "instruct_val.json").read_text())[:n_eval]
    rep = reference_report(val)
    out: dict[str, dict[str, Any]] = {}
    for qtype, refs in rep["references_by_type"].items():
        out[qtype] = {**refs, "n": rep["count_by_type"][qtype], "spatial": qtype in rep["spatial_types"]}
    out["all"] = {**rep["references"], "n": len(val)}
    return out
