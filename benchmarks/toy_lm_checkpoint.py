"""Score the toy-lm checkpoint of a running (or interrupted) ``vlkit toy pretrain`` per question type, from the
scene given as text, exactly as the manifest scores the finished toy-lm (teacher-forced, ``probes.lm_answers``).

    python benchmarks/toy_lm_checkpoint.py /path/.weights.building-<hash> --preset v4 [--log curve.jsonl]

A long pretraining is judged by its learning curve: run this at each checkpoint (every 5 % of the steps) and
append to ``--log``. One torch thread; it reads the checkpoint file and changes nothing.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path, help="the pretraining's work directory (.<out>.building-<config hash>)")
    ap.add_argument("--preset", default="v4", help="the preset being pretrained (its toy-lm architecture)")
    ap.add_argument("--n-eval", type=int, default=400, help="val questions scored (the first N)")
    ap.add_argument("--log", type=Path, help="append the scores as one JSON line")
    args = ap.parse_args()
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from vlkit.toyworld import pretraining, probes, shipped

    torch.set_num_threads(1)
    config = pretraining.pretrain_config(args.preset, 0)
    if not args.work.name.endswith(shipped.config_hash(config)):
        raise SystemExit(f"{args.work} is not the work directory of preset {args.preset} (config hash "
                         f"{shipped.config_hash(config)})")
    state_path = args.work / "checkpoints" / "toy-lm" / "state.pt"
    if not state_path.is_file():
        raise SystemExit(f"no toy-lm checkpoint yet at {state_path}")
    state = torch.load(state_path, weights_only=True)
    tok = AutoTokenizer.from_pretrained(args.work / "weights" / "tokenizer")
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), bos_token_id=None,
                                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                                         pad_token_id=tok.pad_token_id, **config["lm"]["arch"]))
    model.load_state_dict(state["model"])
    model.eval()
    convs, types, _ = probes.val_lm_convs(args.work / "data")
    convs, types = convs[:args.n_eval], types[:args.n_eval]
    hits = probes.lm_answers(model, tok, convs, batch=100)["hits"]
    by: dict[str, list[bool]] = {}
    for t, h in zip(types, hits):
        by.setdefault(t, []).append(h)
    row = {"step": int(state["step"]), "loss_last_50": round(float(np.mean(state["losses"][-50:])), 4),
           "all": round(float(np.mean(hits)), 3), **{t: round(float(np.mean(v)), 3) for t, v in sorted(by.items())},
           "n": len(hits), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(json.dumps(row))
    if args.log:
        with open(args.log, "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
