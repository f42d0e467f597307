"""Learning curves of toy-lm pretraining recipes, per question type, read from the scene given as text.

Pilots for choosing the toy-lm recipe of a world (issue 26): every recipe trains on the *same* stream of chats
(``vlkit.toyworld.models.lm_conversations`` of the world, fresh scenes, ``lm_batch``), one process each, side by
side, and is scored every ``--eval-every`` steps on the world's val questions exactly as the shipped manifest
scores toy-lm (teacher-forced: every answer token is the argmax; ``probes.lm_answers``). Output: one JSON with the
curve of each recipe (overall and per type) and the time per step.

    python benchmarks/toy_lm_curves.py --preset v4 --steps 4000 --device cuda --out /tmp/curves.json

Curves, not end points: a look-up skill appears abruptly after a plateau, so a recipe is judged by where it is
going as well as where it is. On a CPU, run few recipes (``--recipes base,answer_only``) with small ``--steps``.
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import types
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def _import_vlkit_parts():
    """Import the toy world's modules without ``vlkit/__init__`` (which loads the recipe config and pydantic, not
    needed here and absent on some GPU images)."""
    root = Path(__file__).resolve().parents[1]
    if "vlkit" not in sys.modules:
        pkg = types.ModuleType("vlkit")
        pkg.__path__ = [str(root / "vlkit")]
        pkg.__version__ = "pilot"
        sys.modules["vlkit"] = pkg
    from vlkit.toyworld import models, pretraining, probes
    return models, pretraining, probes


# recipe name -> changes to the preset's lm config ("arch" entries change the architecture)
RECIPES: dict[str, dict] = {
    "base": {},
    "answer_only": {"other_token_weight": 0.0},
    "heads4": {"arch": {"num_attention_heads": 4, "num_key_value_heads": 4}},
    "heads4_held_lr": {"arch": {"num_attention_heads": 4, "num_key_value_heads": 4}, "schedule": "held"},
    "heads4_answer_only": {"arch": {"num_attention_heads": 4, "num_key_value_heads": 4}, "other_token_weight": 0.0},
    "heads2": {"arch": {"num_attention_heads": 2, "num_key_value_heads": 2}},
    "layers6_heads4": {"arch": {"num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 4}},
    "wide256_heads8": {"arch": {"hidden_size": 256, "intermediate_size": 704, "num_attention_heads": 8,
                                "num_key_value_heads": 8}},
}


def recipe_cfg(base: dict, change: dict) -> dict:
    cfg = copy.deepcopy(base)
    for k, v in change.items():
        if k == "arch":
            cfg["arch"].update(v)
        else:
            cfg[k] = v
    return cfg


def _make_batches(args) -> list:
    """``lm_batch`` of one chunk of the shared stream: ``convs`` cut into batches of ``batch``."""
    convs, batch, tok_dir = args  # plain data: a child may not find vlkit to unpickle
    models, _, _ = _import_vlkit_parts()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    out = []
    for i in range(0, len(convs), batch):
        b = models.lm_batch(tok, convs[i:i + batch], 0.0)  # weights: 1 on answers, else 0
        out.append({"input_ids": b["input_ids"].short(), "attention_mask": b["attention_mask"].bool(),
                    "answer": b["weights"] > 0})
    return out


def _train_one(name: str, cfg: dict, stream_path: str, tok_dir: str, val_convs, val_types, steps: int,
               eval_every: int, device: str, seed: int, out_path: str, threads: int, parent: int) -> None:
    import numpy as np
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    models, _, probes = _import_vlkit_parts()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), bos_token_id=None, eos_token_id=im_end,
                                         pad_token_id=tok.pad_token_id, **cfg["arch"])).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01, betas=(0.9, 0.95))
    stream = torch.load(stream_path, weights_only=True)
    warmup = max(1, steps // 20)
    curve, losses, t0 = [], [], time.perf_counter()

    def score(step: int) -> None:
        model.eval()
        hits = probes.lm_answers(model, tok, val_convs, batch=200)["hits"]
        model.train()
        by: dict[str, list] = {}
        for t, h in zip(val_types, hits):
            by.setdefault(t, []).append(h)
        curve.append({"step": step, "loss": round(float(np.mean(losses[-50:])), 4) if losses else None,
                      "all": round(float(np.mean(hits)), 3),
                      **{t: round(float(np.mean(v)), 3) for t, v in sorted(by.items())},
                      "seconds": round(time.perf_counter() - t0, 1)})
        Path(out_path).write_text(json.dumps({"recipe": name, "config": cfg, "curve": curve}))

    model.train()
    for step in range(steps):
        if step % 50 == 0 and os.getppid() != parent:  # the parent was killed: stop rather than run on unseen
            raise SystemExit(f"{name}: the parent process is gone")
        b = stream[step % len(stream)]
        ids, att, ans = b["input_ids"].long().to(device), b["attention_mask"].long().to(device), b["answer"].to(device)
        weights = torch.where(ans, 1.0, cfg["other_token_weight"]) * att
        if cfg.get("schedule") == "held":
            lr = cfg["lr"] * min(1.0, (step + 1) / warmup)
        else:
            lr = models.cosine_lr(step, steps, cfg["lr"], warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = models.lm_loss(model, {"input_ids": ids, "attention_mask": att, "weights": weights})
        losses.append(models._step(loss, model, opt))
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            score(step + 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="v4")
    ap.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                    help="change the preset's world, e.g. cell_names=compass (repeatable)")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--n-eval", type=int, default=400, help="val questions scored (balanced over types)")
    ap.add_argument("--n-train-scenes", type=int, default=4000, help="scenes behind the pilot tokenizer")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per recipe process")
    ap.add_argument("--max-seconds", type=float, default=1e9, help="stop every recipe after this and report")
    ap.add_argument("--out", default="toy_lm_curves.json")
    args = ap.parse_args()
    models, pretraining, probes = _import_vlkit_parts()
    from vlkit.data import toy
    from vlkit.toyworld.tokenizer import build_tokenizer
    import torch

    t_start = time.perf_counter()
    config = pretraining.pretrain_config(args.preset, 0)
    for change in args.data:
        key, _, value = change.partition("=")
        if key not in config["data"] and key not in ("cell_names", "min_objects", "max_repeat", "cell_questions",
                                                     "relations"):
            raise SystemExit(f"--data {change}: unknown world key {key!r}; valid: {', '.join(config['data'])}")
        config["data"][key] = int(value) if value.isdigit() else value
    work = Path(tempfile.mkdtemp(prefix="toy-lm-curves-"))
    data_cfg = dict(config["data"], n_train=args.n_train_scenes, n_test=8)
    toy.generate_toy_data(work / "data", seed=0, **data_cfg)
    build_tokenizer(work / "data", work / "tokenizer")
    convs, qtypes, _ = probes.val_lm_convs(work / "data")
    convs, qtypes = convs[:args.n_eval], qtypes[:args.n_eval]
    # the chats once, in order (cheap), then tokenised in chunks of whole batches by worker processes
    convs_all = models.lm_conversations(args.steps * args.batch, 0, config["lm"], **models.world_scenes(config["data"]))
    chunks = max(1, min(os.cpu_count() or 1, 16))
    per = -(-args.steps // chunks) * args.batch
    jobs = [(convs_all[lo:lo + per], args.batch, str(work / "tokenizer")) for lo in range(0, len(convs_all), per)]
    # an executor, not a Pool: a worker that dies raises here instead of hanging
    with ProcessPoolExecutor(len(jobs), mp_context=mp.get_context("spawn")) as pool:
        stream = [b for part in pool.map(_make_batches, jobs) for b in part]
    torch.save(stream, work / "stream.pt")
    t_data = time.perf_counter() - t_start
    print(f"stream of {len(stream)} batches x {args.batch} chats ready in {t_data:.0f} s", flush=True)

    names = [n for n in args.recipes.split(",") if n]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; valid: {', '.join(RECIPES)}")
    ctx = mp.get_context("spawn")
    procs = {}
    for name in names:
        cfg = recipe_cfg(config["lm"], RECIPES[name])
        path = work / f"curve_{name}.json"
        p = ctx.Process(target=_train_one, args=(name, cfg, str(work / "stream.pt"), str(work / "tokenizer"), convs,
                                                 qtypes, args.steps, args.eval_every, args.device, 0, str(path),
                                                 args.threads, os.getpid()))
        p.start()
        procs[name] = (p, path)
    deadline = time.perf_counter() + args.max_seconds - t_data
    while any(p.is_alive() for p, _ in procs.values()) and time.perf_counter() < deadline:
        time.sleep(2)
        _write(args.out, procs, t_data, args, config)
    for p, _ in procs.values():
        if p.is_alive():
            p.terminate()
        p.join()
    _write(args.out, procs, t_data, args, config)
    print(json.dumps({n: (r["curve"][-1] if r.get("curve") else None)
                      for n, r in json.loads(Path(args.out).read_text())["recipes"].items()}, indent=1))


def _write(out: str, procs: dict, t_data: float, args, config: dict) -> None:
    recipes = {}
    for name, (p, path) in procs.items():
        try:
            recipes[name] = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            recipes[name] = {"recipe": name, "curve": [], "exitcode": p.exitcode}
    Path(out).write_text(json.dumps({"preset": args.preset, "world_data": config["data"], "steps": args.steps,
                                     "batch": args.batch, "device": args.device, "stream_seconds": round(t_data, 1),
                                     "recipes": recipes}, indent=1))


if __name__ == "__main__":
    main()
