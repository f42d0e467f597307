"""`vlkit train` end to end on the tiny toy world: stages, outputs, exact resume after SIGKILL, failures."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from rich.console import Console

from helpers import FAST, losses, vlkit
from vlkit.config import load_recipe
from vlkit.train import TrainingError, train


def test_two_stages_write_run_directory(tiny_toy_world, tmp_path):
    res = vlkit("train", "recipes/mlp_patch.yaml", *FAST, "--run-dir", str(tmp_path / "run"))
    run = tmp_path / "run"
    assert "pre-flight" in res.stdout and "instruct: generation accuracy" in res.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and set(summary["stages"]) == {"align", "instruct"}
    from vlkit.toyworld import world_id

    assert summary["toy_world"] == world_id("tiny")  # which toy world's weights and data it used
    inst = summary["stages"]["instruct"]
    assert {"accuracy", "accuracy_by_type", "val_loss", "tokens_per_s", "trainable_params"} <= set(inst)
    assert len(inst["accuracy_by_type"]) >= 6
    # the references the evaluated questions carry, per type, in summary.json and in the printed table
    refs = {"blind", "uniform", "position_blind", "toy_lm_from_text"}
    assert set(inst["references"]) == refs and set(inst["references_by_type"]) == set(inst["accuracy_by_type"])
    assert set(inst["spatial_types"]) <= set(inst["accuracy_by_type"]) and "relation" in inst["spatial_types"]
    assert all(set(v) == refs for v in inst["references_by_type"].values())
    assert inst["references_by_type"]["count"]["position_blind"] == 1.0
    for column in ("uniform", "chance", "blind to", "toy-lm", "relation ◆", "◆ spatial"):
        assert column in res.stdout, column
    # the default trains LoRA in both stages (projector + LoRA); instruct never trains less than align
    assert 0 < summary["stages"]["align"]["trainable_params"] <= inst["trainable_params"]
    rows = losses(run)
    assert [s for s, _, _ in rows].count("align") == 3 and [s for s, _, _ in rows].count("instruct") == 6
    for stage in ("align", "instruct"):
        assert (run / "checkpoints" / stage / "final" / "trainable.safetensors").exists()
    from safetensors.torch import load_file

    inst_w = load_file(str(run / "checkpoints/instruct/final/trainable.safetensors"))
    assert any("lora_" in k for k in inst_w) and any(k.startswith("projector.") for k in inst_w)
    assert not any(k.startswith("encoder.") for k in inst_w)  # only what trained is saved
    # the trained run answers through predict and eval
    out = vlkit("predict", str(run), "--batch", str(tiny_toy_world.data_dir / "instruct_val.json"),
                "--out", str(tmp_path / "pred.json"))
    assert len(json.loads((tmp_path / "pred.json").read_text())) > 0, out.stdout
    ev = vlkit("eval", str(run), "--data", "toy:data/instruct_val.json", "--max-samples", "16")
    assert "accuracy" in ev.stdout
    # every end-of-stage evaluation keeps its answers, one row per question, out of summary.json
    from vlkit.evaluate import read_predictions

    assert "predictions" not in inst and "predictions" not in json.dumps(summary["stages"]["align"])
    for stage in ("align", "instruct"):
        kept = read_predictions(run / f"predictions_{stage}.jsonl")
        counts = summary["stages"][stage]["count_by_type"]
        assert len(kept) == sum(counts.values()) and len({r["id"] for r in kept}) == len(kept)
        for qtype, acc in summary["stages"][stage]["accuracy_by_type"].items():
            hits = [r["correct"] for r in kept if r["question_type"] == qtype]
            assert len(hits) == counts[qtype] and abs(sum(hits) / len(hits) - acc) < 1e-12
    assert {"reference", "prediction"} <= set(kept[0])
    evald = read_predictions(run / "predictions_eval_instruct_val.jsonl")
    assert len(evald) == 16 and "predictions_eval_instruct_val.jsonl" in ev.stdout


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_loss_curve(tiny_toy_world, tmp_path):
    # LoRA dropout on (the default recipe has none): its masks come from the global RNG, so matching the curve
    # after the kill also checks that the RNG state is restored mid-stage (see the bound below)
    args = ["train", "recipes/mlp_patch.yaml", *FAST, "stages.instruct.max_steps=10", "stages.instruct.save_every=2",
            "stages.align.save_every=2", "stages.align.lora.dropout=0.05",
            "stages.instruct.lora.dropout=0.05"]
    vlkit(*args, "--run-dir", str(tmp_path / "straight"))
    killed = tmp_path / "killed"
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "vlkit.cli", *args, "--run-dir", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 900  # a generous bound for a loaded machine; the test does not time anything
    while time.time() < deadline and proc.poll() is None:
        if any(s == "instruct" and st >= 5 for s, st, _ in losses_so_far(killed)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = losses_so_far(killed)
    assert any(s == "instruct" for s, _, _ in partial) and len(partial) < 13, partial
    res = vlkit(*args, "--run-dir", str(killed))
    resumed, straight = losses(killed), losses(tmp_path / "straight")
    # what a failure needs to be read: where the resume started and what the killed process had logged
    where = [line for line in res.stdout.splitlines() if "resuming" in line or "torch threads" in line]
    why = f"{where}; killed after {partial[-1][:2]}"
    # weights, optimizer, RNG (dropout masks), data position and torch thread count are restored, and every process
    # warms MKL's vector math up on import (vlkit/_numerics.py): without that, ~3% of processes computed their first
    # step a few ulps off, resumed or not. So the resumed curve is the uninterrupted one, bit for bit.
    assert resumed == straight, why


def losses_so_far(run_dir: Path) -> list[tuple[str, int, float]]:
    """The losses of a run being written (or killed while writing): a last line cut short is left out."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().split("\n") if path.exists() else []
    rows = [json.loads(line) for line in lines[:-1]]  # the part after the last newline may be a torn line
    return [(r["stage"], r["step"], r["loss"]) for r in rows if "loss" in r]


def test_resume_uses_the_checkpointed_thread_count(tiny_toy_world, tmp_path):
    """Another thread count changes large sums in the last bits; a resumed stage runs with the one it started with
    (train.deterministic), and train() gives the caller its own count back."""
    r = load_recipe("mlp_patch", [*FAST, "train.stages=[align]", "stages.align.eval_data=null",
                                  "stages.align.save_every=1"])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        train(r, tmp_path / "run", console=Console(quiet=True), stop_after=("align", 2))
        torch.set_num_threads(2)
        summary = train(r, tmp_path / "run", console=Console(quiet=True))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert summary["stages"]["align"]["threads"] == 1
    state = json.loads((tmp_path / "run/checkpoints/align/last/state.json").read_text())
    assert state["step"] == 3 and state["threads"] == 1


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tiny_toy_world, tmp_path, monkeypatch):
    from vlkit import model as model_mod

    orig = model_mod.VLM.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        out = orig(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss_sum = out.loss_sum * float("nan")
        return out

    monkeypatch.setattr(model_mod.VLM, "forward", poisoned)
    r = load_recipe("mlp_patch", FAST + ["stages.align.save_every=1", "train.stages=[align]"])
    with pytest.raises(TrainingError, match=r"stage 'align' step 3: loss is nan"):
        train(r, tmp_path / "run")
    state = json.loads((tmp_path / "run/checkpoints/align/last/state.json").read_text())
    assert state["step"] == 2


def write_png(path: Path, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (40, 30), (200, 30, 30))
    if mode == "L":
        img = img.convert("L")
    elif mode == "RGBA":
        img = img.convert("RGBA")
    elif mode == "P":
        img = img.convert("P")
    img.save(path)


def test_real_format_file_trains_and_bad_file_is_reported(tiny_toy_world, tmp_path):
    root = tmp_path / "images"
    for name, mode in (("gray.png", "L"), ("rgba.png", "RGBA"), ("pal.png", "P"), ("sub/photo.png", "RGB")):
        write_png(root / name, mode)
    good = [
        {"id": "g1", "image": "gray.png", "conversations": [{"from": "human", "value": "What colour?\n<image>"},
                                                           {"from": "gpt", "value": "red"}]},
        {"id": "g2", "image": "rgba.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a red square"},
            {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "1"}]},
        {"id": "g3", "image": "pal.png", "conversations": [{"from": "human", "value": "<image>\nIs it red?"},
                                                          {"from": "gpt", "value": "yes"}]},
        {"id": "g4", "image": "sub/photo.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                                {"from": "gpt", "value": "red"}]},
        {"id": "t1", "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]},
    ]
    (tmp_path / "good.json").write_text(json.dumps(good))
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "outside.png").write_bytes(b"")
    bad = good + [
        {"id": "b1", "image": "missing.png", "conversations": good[0]["conversations"]},
        {"id": "b2", "image": "corrupt.png", "conversations": good[0]["conversations"]},
        {"id": "b3", "image": "../outside.png", "conversations": good[0]["conversations"]},
        {"id": "b4", "image": "gray.png", "conversations": [{"from": "human", "value": "no placeholder"},
                                                           {"from": "gpt", "value": "x"}]},
        {"id": "b5", "conversations": []},
        {"id": "b6", "conversations": [{"from": "robot", "value": "hi"}]},
    ]
    (tmp_path / "bad.json").write_text(json.dumps(bad))

    ok = vlkit("data", "check", str(tmp_path / "good.json"), "--image-root", str(root), "--recipe", "mlp_patch")
    assert "every record is usable" in ok.stdout
    res = vlkit("data", "check", str(tmp_path / "bad.json"), "--image-root", str(root), check=False)
    assert res.returncode == 1
    for rid, kind in (("b1", "image_missing"), ("b2", "image_corrupt"), ("b3", "path_escapes_root"),
                      ("b4", "malformed"), ("b5", "malformed"), ("b6", "malformed")):
        assert f"record {rid} " in res.stdout and kind in res.stdout, (rid, res.stdout)

    common = [f"data.image_root={root}", "train.stages=[instruct]", "stages.instruct.max_steps=2",
              "stages.instruct.batch_size=2", "stages.instruct.eval_data=null"]
    vlkit("train", "recipes/mlp_patch.yaml", *common, f"stages.instruct.data={tmp_path / 'good.json'}",
          "--run-dir", str(tmp_path / "run_good"))
    assert len(losses(tmp_path / "run_good")) == 2
    stop = vlkit("train", "recipes/mlp_patch.yaml", *common, f"stages.instruct.data={tmp_path / 'bad.json'}",
                 "--run-dir", str(tmp_path / "run_bad"), check=False)
    assert stop.returncode == 1 and "6 bad record(s)" in stop.stderr + stop.stdout
    assert not (tmp_path / "run_bad" / "metrics.jsonl").exists()  # stopped before step 1
    skip = vlkit("train", "recipes/mlp_patch.yaml", *common, f"stages.instruct.data={tmp_path / 'bad.json'}",
                 "data.skip_bad=true", "--run-dir", str(tmp_path / "run_skip"))
    assert "skipping 6 record(s)" in skip.stdout
    assert json.loads((tmp_path / "run_skip/summary.json").read_text())["stages"]["instruct"]["skipped_records"] == 6


def test_dry_run_and_config_errors(tiny_toy_world, tmp_path):
    res = vlkit("train", "recipes/mlp_patch.yaml", *FAST, "--dry-run", "--run-dir", str(tmp_path / "dry"))
    assert "pre-flight" in res.stdout and "dry run: one step done" in res.stdout
    bad = vlkit("inspect", "recipes/mlp_patch.yaml", "projector.dept=3", check=False)
    assert bad.returncode == 2 and "projector" in bad.stderr and "Did you mean 'depth'" in bad.stderr
    p = tmp_path / "typo.yaml"
    p.write_text("base: " + str(Path("recipes/mlp_patch.yaml").resolve()) + "\nstages:\n  align:\n    lr_sheduler: 1\n")
    bad = vlkit("inspect", str(p), check=False)
    assert bad.returncode == 2 and str(p) in bad.stderr and "stages.align.lr_sheduler" in bad.stderr


def test_inspect_shows_components_and_mask(tiny_toy_world):
    res = vlkit("inspect", "recipes/mlp_patch.yaml")
    for text in ("hf_clip", "built-in", "image tokens per image: 16", "northwest:<image>×1, north:<image>×2",
                 "supervised"):
        assert text in res.stdout, text


def test_loader_workers_keep_the_batch_order(tiny_toy_world, tmp_path):
    """data.num_workers > 0 loads images in worker processes; the batches, and so the losses, are unchanged."""
    curves = []
    for workers in (0, 2):
        r = load_recipe("mlp_patch", [*FAST, "train.stages=[align]", "stages.align.eval_data=null",
                                      f"data.num_workers={workers}"])
        train(r, tmp_path / f"w{workers}", console=Console(quiet=True))
        curves.append(losses(tmp_path / f"w{workers}"))
    assert len(curves[0]) == 3 and curves[0] == curves[1]


def test_images_read_follows_the_training_order():
    """The feature cache is filled with the images the stage's micro-batches draw, epoch after epoch."""
    from types import SimpleNamespace

    from vlkit.data.collate import epoch_batches
    from vlkit.train import images_read

    examples = [SimpleNamespace(image=f"{i}.png" if i % 5 else None) for i in range(40)]
    train_set = type("Train", (), {"examples": examples, "__len__": lambda self: len(examples)})()
    data = SimpleNamespace(train=train_set, lengths=[10 + i % 7 for i in range(40)],
                           has_image=[e.image is not None for e in examples])
    first = epoch_batches(data.lengths, data.has_image, 4, 3, 0)
    got = images_read(data, 4, 3, True, 2)
    assert got == [examples[i].image for i in sorted(first[0] + first[1]) if examples[i].image]
    every = [e.image for e in examples if e.image]
    assert images_read(data, 4, 3, True, 10) == every  # one epoch: all of them
    assert images_read(data, 4, 3, True, 25) == every  # into the second epoch: still each image once
