"""Learning curves of toy-lm pretraining recipes, per question type, read from the scene given as text.

Pilots for choosing the toy-lm recipe of a world (issue 26): each recipe draws its chats step by step exactly as
``vlkit toy pretrain`` does for a phased recipe (``models.lm_chats`` of its phase from the RNG ``[0, 202]``, fresh
scenes; recipes with the same phases see the same chats), with ``models.lm_lr``'s schedule, one process each, side
by side, and is scored every ``--eval-every`` steps on the world's val questions exactly as the manifest scores
toy-lm (teacher-forced: every answer token is the argmax; ``probes.lm_answers``). Output: one JSON with the curve
of each recipe (overall and per type) and the time per step.

    python benchmarks/toy_lm_curves.py --preset v4 --steps 4000 --device cuda --out /tmp/curves.json

Curves, not end points: a look-up skill appears abruptly after a plateau, so a recipe is judged by where it is
going as well as where it is. On a CPU, run few recipes (``--recipes lookups_only,lookups_first``) with small
``--steps``. Recipes are changes to the shipped toy-lm recipe (``PRESETS["default"]["lm"]``); ``preset`` is the
``--preset``'s own.
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


# recipe name -> changes to the shipped toy-lm recipe ("arch" entries change the architecture); a recipe's last
# phase runs the steps its other phases leave
HEADS4 = {"num_attention_heads": 4, "num_key_value_heads": 4}
LOOKUPS = ["colour_at_position", "shape_at_position", "shape_of_colour"]
RECIPES: dict[str, dict] = {
    "base": {},
    "answer_only": {"other_token_weight": 0.0},
    "heads4": {"arch": HEADS4},
    "heads4_held_lr": {"arch": HEADS4, "schedule": "held"},
    "heads4_answer_only": {"arch": HEADS4, "other_token_weight": 0.0},
    "heads2": {"arch": {"num_attention_heads": 2, "num_key_value_heads": 2}},
    "layers6_heads4": {"arch": {"num_hidden_layers": 6, **HEADS4}},
    "wide256_heads8": {"arch": {"hidden_size": 256, "intermediate_size": 704, "num_attention_heads": 8,
                                "num_key_value_heads": 8}},
    # single look-ups only, 10-14 per chat, lr 1e-3 held (the first phase of the v4 recipe, run on)
    "lookups_only": {"arch": HEADS4, "lr": 1e-3, "schedule": "held",
                     "phases": [{"steps": 0, "types": LOOKUPS, "turns": [10, 14], "caption_share": 0.0}]},
    # at the shipped 3e-3 and 6-10 questions per chat; and the same with loss on answers only
    "lookups_only_lr3": {"arch": HEADS4, "schedule": "held",
                         "phases": [{"steps": 0, "types": LOOKUPS, "turns": [6, 10], "caption_share": 0.0}]},
    "lookups_only_lr3_answer_only": {"arch": HEADS4, "schedule": "held", "other_token_weight": 0.0,
                                     "phases": [{"steps": 0, "types": LOOKUPS, "turns": [6, 10],
                                                 "caption_share": 0.0}]},
    # every type from step 0 with half the chats copying the scene (induction heads from copying), lr 1e-3 held
    "copy_half": {"arch": HEADS4, "lr": 1e-3, "schedule": "held", "caption_share": 0.5},
    "preset": None,  # the --preset's own recipe, at --steps (its phases but the last kept)
}


def recipe_cfg(base: dict, change: dict, steps: int) -> dict:
    """``base`` with ``change`` applied, run for ``steps`` (the last phase takes what the others leave)."""
    cfg = copy.deepcopy(base)
    for k, v in copy.deepcopy(change).items():
        if k == "arch":
            cfg["arch"].update(v)
        else:
            cfg[k] = v
    cfg["steps"] = steps
    if cfg.get("phases"):
        rest = steps - sum(ph["steps"] for ph in cfg["phases"][:-1])
        if rest <= 0:
            raise SystemExit(f"--steps {steps} leaves no step for the recipe's last phase")
        cfg["phases"][-1]["steps"] = rest
    return cfg


def _train_one(name: str, cfg: dict, world: dict, tok_dir: str, val_convs, val_types, eval_every: int, device: str,
               seed: int, out_path: str, threads: int, parent: int) -> None:
    import numpy as np
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    models, _, probes = _import_vlkit_parts()
    from vlkit.data import toy

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), bos_token_id=None, eos_token_id=im_end,
                                         pad_token_id=tok.pad_token_id, **cfg["arch"])).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01, betas=(0.9, 0.95))
    phases = models.lm_phases(cfg)
    rng = np.random.default_rng([seed, 202])
    rules = toy.QuestionRules(*world.pop("rules"))
    steps = cfg["steps"]
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
        chats = models.lm_chats(rng, cfg["batch"], models.phase_at(phases, step), rules=rules, **world)
        b = models.lm_batch(tok, chats, cfg["other_token_weight"])
        b = {k: v.to(device) for k, v in b.items()}
        for g in opt.param_groups:
            g["lr"] = models.lm_lr(step, cfg)
        losses.append(models._step(models.lm_loss(model, b), model, opt))
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
    world = models.world_scenes(config["data"])
    r = world["rules"]
    world["rules"] = (r.cells, r.relations, r.cell_names)  # plain data for the spawned processes
    t_data = time.perf_counter() - t_start
    names = [n for n in args.recipes.split(",") if n]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; valid: {', '.join(RECIPES)}")
    ctx = mp.get_context("spawn")
    procs = {}
    shipped_lm = pretraining.pretrain_config("default", 0)["lm"]
    for name in names:
        cfg = recipe_cfg(config["lm"], {}, args.steps) if RECIPES[name] is None else recipe_cfg(
            dict(shipped_lm, batch=args.batch), RECIPES[name], args.steps)
        cfg["batch"] = args.batch
        path = work / f"curve_{name}.json"
        p = ctx.Process(target=_train_one, args=(name, cfg, dict(world), str(work / "tokenizer"), convs, qtypes,
                                                 args.eval_every, args.device, 0, str(path), args.threads,
                                                 os.getpid()))
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
                                     "batch": args.batch, "device": args.device, "setup_seconds": round(t_data, 1),
                                     "recipes": recipes}, indent=1))


if __name__ == "__main__":
    main()
