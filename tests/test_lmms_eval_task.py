"""vlkit.lmms_eval_task without lmms-eval: the task folder it writes (YAML with !function tags, JSON lines, utils)."""
from __future__ import annotations

import importlib.util
import json

import pytest
import yaml
from PIL import Image

from vlkit.lmms_eval_task import write_task


class _TaskLoader(yaml.SafeLoader):
    """Reads lmms-eval's ``!function module.name`` tag as a plain string."""


_TaskLoader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))


def test_written_task_scores_like_vlkit_eval(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8), "red").save(images / "a.png")
    records = [{"id": "q1", "image": "a.png", "question_type": "colour", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "q2", "conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]}]
    out = write_task(records, images, tmp_path / "task", name="my_task", max_new_tokens=8)
    task = yaml.load((out / "my_task.yaml").read_text(), Loader=_TaskLoader)
    assert task["dataset_path"] == "json" and task["dataset_kwargs"]["data_files"]["test"] == str(out / "my_task.jsonl")
    assert task["process_results"] == "!function my_task_utils.process_results"
    assert task["generation_kwargs"]["max_new_tokens"] == 8
    docs = [json.loads(line) for line in (out / "my_task.jsonl").read_text().splitlines()]
    assert [d["answer"] for d in docs] == ["Red.", "hi"] and docs[1]["image"] is None
    assert docs[0]["image"] == str((images / "a.png").resolve())
    spec = importlib.util.spec_from_file_location("my_task_utils", out / "my_task_utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    assert utils.doc_to_visual(docs[0])[0].size == (8, 8) and utils.doc_to_visual(docs[1]) == []
    assert utils.doc_to_text(docs[0]) == "<image>\nWhat colour?"
    assert utils.process_results(docs[0], [" the red "]) == {"exact_match": 1.0}  # vlkit's normalisation
    assert utils.process_results(docs[0], ["blue"]) == {"exact_match": 0.0}
    with pytest.raises(ValueError, match="identifier"):
        write_task(records, images, tmp_path / "bad", name="my-task")
    with pytest.raises(ValueError, match="escapes|outside|root"):
        write_task([{**records[0], "image": "../x.png"}], images, tmp_path / "bad2")
