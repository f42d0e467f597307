"""lmms-eval's own CLI with ``--model vlkit`` on a local task over the toy world's val questions, offline: its
accuracy equals ``vlkit eval``'s on the same questions and run, and every answer equals ``vlkit predict``'s.

The run is trained for 2 + 2 steps on the embedded default (the shipped toy-clip / toy-lm, which answer from the
first steps; the tiny preset's models answer nothing yet), on 64-record slices of its training files."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'vlkit[lmms]')")

ROOT = Path(__file__).resolve().parents[1]
N_VAL = 40
# vlkit's answers, as vlkit eval makes them (vlkit.evaluate.generate_answers), one JSON list on the last line
_ANSWERS = """
import json, sys
from vlkit.data.llava import ImageTransform, load_records
from vlkit.evaluate import generate_answers
from vlkit.export import load_model
model, recipe, device = load_model(sys.argv[1])
t = ImageTransform(model.encoder.image_size, model.encoder.mean, model.encoder.std)
print(json.dumps(generate_answers(model, load_records(sys.argv[2]), sys.argv[3], t, device, batch_size=1,
                                  max_new_tokens=16)))
"""


def _run(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


@pytest.mark.slow
def test_lmms_eval_cli_accuracy_equals_vlkit_eval(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lmms_cli")
    env = {k: v for k, v in os.environ.items() if k != "VLKIT_TOY_PRESET"}  # the embedded default, not tiny
    env.update(VLKIT_TOY_DIR=os.environ.get("VLKIT_TEST_DEFAULT_TOY_DIR") or str(tmp_path_factory.mktemp("toy")),
               VLKIT_TOKENIZED_DIR=str(tmp / "tokenized"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp / "hf_datasets"), COLUMNS="200", OMP_NUM_THREADS="1")
    data_dir = Path(_run(["-c", "from vlkit.toyworld import ensure_toy_world; print(ensure_toy_world().data_dir)"],
                         env).stdout.strip().splitlines()[-1])
    files = {}
    for name, n in (("align_train", 64), ("instruct_train", 64), ("instruct_val", N_VAL)):
        records = json.loads((data_dir / f"{name}.json").read_text())[:n]
        files[name] = tmp / f"{name}.json"
        files[name].write_text(json.dumps(records))
    run = tmp / "run"
    _run(["-m", "vlkit.cli", "train", "recipes/mlp_patch.yaml", f"stages.align.data={files['align_train']}",
          f"stages.instruct.data={files['instruct_train']}", "stages.align.max_steps=2", "stages.instruct.max_steps=2",
          "stages.align.batch_size=8", "stages.instruct.batch_size=8", "stages.align.eval_data=null",
          "stages.instruct.eval_data=null", "--run-dir", str(run)], env)

    # vlkit's own numbers: accuracy (vlkit eval) and every answer (the function vlkit eval calls), greedy, 16 new
    # tokens, batch 1
    out = _run(["-m", "vlkit.cli", "eval", str(run), "--data", str(files["instruct_val"]), "--batch-size", "1",
                "--max-new-tokens", "16"], env).stdout
    row = re.search(rf"\ball\s*│\s*{N_VAL}\s*│\s*([0-9.]+)", out)
    assert row, out
    vlkit_accuracy = float(row.group(1))
    answers = _run(["-c", _ANSWERS, str(run), str(files["instruct_val"]), str(data_dir / "images")], env).stdout
    vlkit_answers = json.loads(answers.strip().splitlines()[-1])

    # lmms-eval's CLI over the same questions as a local task (no hub)
    task = tmp / "task"
    _run(["-m", "vlkit.lmms_eval_task", str(files["instruct_val"]), "--image-root", str(data_dir / "images"),
          "--out", str(task), "--name", "vlkit_toy_val"], env)
    results = tmp / "lmms_out"
    _run(["-m", "lmms_eval", "--model", "vlkit", "--model_args", f"run={run},max_new_tokens=16",
          "--tasks", "vlkit_toy_val", "--include_path", str(task), "--batch_size", "1", "--device", "cpu",
          "--output_path", str(results), "--log_samples"], env)
    agg = json.loads(next(results.rglob("*_results.json")).read_text())["results"]["vlkit_toy_val"]
    samples = [json.loads(line) for line in next(results.rglob("*_samples_vlkit_toy_val.jsonl")).read_text().splitlines()]
    by_doc = {s["doc_id"]: s for s in samples}
    assert len(by_doc) == N_VAL

    lmms_answers = [str(by_doc[i]["filtered_resps"][0] if isinstance(by_doc[i]["filtered_resps"], list)
                        else by_doc[i]["filtered_resps"]).strip() for i in range(N_VAL)]
    assert lmms_answers == vlkit_answers
    assert len(set(vlkit_answers)) > 1, f"degenerate run: every answer is {vlkit_answers[0]!r}"
    assert 0 < vlkit_accuracy < 1  # the comparison below means something
    assert agg["exact_match,none"] == pytest.approx(vlkit_accuracy, abs=0.0005)  # vlkit eval prints 3 decimals
    hits = sum(s["exact_match"] for s in samples)
    assert hits == round(vlkit_accuracy * N_VAL)
    print(f"lmms-eval exact_match {agg['exact_match,none']:.4f} ({hits:.0f}/{N_VAL}) = vlkit eval accuracy "
          f"{vlkit_accuracy:.3f}; {len(set(vlkit_answers))} distinct answers, all {N_VAL} identical")
