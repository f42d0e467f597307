"""A truncated JPEG (headers intact, pixels cut short): named by `vlkit data check` before step 1; during training
skipped and counted under data.skip_bad, otherwise the run stops naming the record and file, checkpoint kept."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from helpers import losses, vlkit
from vlkit.config import load_recipe
from vlkit.data.llava import DataError, check_records
from vlkit.train import train

CONV = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]


def jpeg_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (48, 48, 3)).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def make_data(tmp_path: Path, truncated: bool = True) -> tuple[Path, Path]:
    """Four good records and `b-corrupt`, whose JPEG is cut in half (when `truncated`)."""
    root = tmp_path / "images"
    root.mkdir()
    for k in range(5):
        (root / f"{k}.jpg").write_bytes(jpeg_bytes(k))
    if truncated:
        truncate(root / "4.jpg")
    records = [{"id": f"g{k}", "image": f"{k}.jpg", "conversations": CONV} for k in range(4)]
    records.append({"id": "b-corrupt", "image": "4.jpg", "conversations": CONV})
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path / "data.json", root


def instruct_only(data: Path, root: Path, *extra: str) -> list[str]:
    return [f"data.image_root={root}", "train.stages=[instruct]", f"stages.instruct.data={data}",
            "stages.instruct.max_steps=6", "stages.instruct.batch_size=2", "stages.instruct.eval_data=null",
            "data.max_length=224", *extra]


def test_headers_pass_but_full_decode_names_the_truncated_file(tmp_path):
    data, root = make_data(tmp_path)
    records = json.loads(data.read_text())
    _, shallow = check_records(records, root, decode_images=False)
    assert shallow == []  # PIL's verify() reads headers only: the truncation is invisible to it
    for workers in (1, 2):
        good, problems = check_records(records, root, decode_images=True, workers=workers)
        assert [(p.id, p.kind) for p in problems] == [("b-corrupt", "image_corrupt")], workers
        assert "truncated" in problems[0].message and "4.jpg" in problems[0].message
        assert [e.index for e in good] == [0, 1, 2, 3]


def test_data_check_command_names_the_truncated_jpeg(tmp_path):
    data, root = make_data(tmp_path)
    res = vlkit("data", "check", str(data), "--image-root", str(root), "--workers", "2", check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "record b-corrupt (#4) [image_corrupt]" in res.stdout and "truncated" in res.stdout, res.stdout
    assert "decoded 5 images" in res.stdout and "images/s" in res.stdout


def test_truncated_image_during_training_is_skipped_and_counted(tiny_toy_world, tmp_path):
    data, root = make_data(tmp_path)  # the training pre-check reads headers only, so the loader meets the file
    r = load_recipe("mlp_patch", instruct_only(data, root, "data.skip_bad=true", "stages.instruct.save_every=3"))
    summary = train(r, tmp_path / "run", console=Console(quiet=True))
    inst = summary["stages"]["instruct"]
    assert inst["steps"] == 6 and inst["skipped_images"] >= 2  # 6 steps x 2 samples = 3 epochs over 5 records
    assert set(inst["skipped_image_records"]) == {"b-corrupt"}
    assert json.loads((tmp_path / "run/summary.json").read_text())["stages"]["instruct"]["skipped_images"] == \
        inst["skipped_images"]
    rows = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert max(row.get("skipped_images", 0) for row in rows) == inst["skipped_images"]
    assert all(np.isfinite(loss) for _, _, loss in losses(tmp_path / "run"))


def test_truncated_image_during_training_stops_naming_record_and_file(tiny_toy_world, tmp_path):
    data, root = make_data(tmp_path, truncated=False)
    args = instruct_only(data, root, "stages.instruct.save_every=1", "data.num_workers=2")
    train(load_recipe("mlp_patch", args), tmp_path / "run", console=Console(quiet=True), stop_after=("instruct", 1))
    truncate(root / "4.jpg")  # the file changes after the check and the first step
    res = vlkit("train", "recipes/mlp_patch.yaml", *args, "--run-dir", str(tmp_path / "run"), check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    err = " ".join((res.stderr + res.stdout).split())  # rich wraps long lines
    assert "DataError: record b-corrupt (#4)" in err and "4.jpg" in err and "truncated" in err, err
    assert "checkpoints/instruct/last" in err and "data.skip_bad=true" in err, err
    assert "Traceback" not in res.stderr, res.stderr  # no loader-worker traceback
    state = json.loads((tmp_path / "run/checkpoints/instruct/last/state.json").read_text())
    assert 1 <= state["step"] < 6
    assert not (tmp_path / "run/checkpoints/instruct/final").exists()


def test_loader_without_keep_bad_names_the_record(tmp_path):
    from vlkit.data.llava import ImageTransform, LlavaDataset

    data, root = make_data(tmp_path)
    good, _ = check_records(json.loads(data.read_text()), root, decode_images=False)
    ds = LlavaDataset(good, root, ImageTransform(32, (0.5,) * 3, (0.5,) * 3))
    with pytest.raises(DataError, match=r"record #4: image '.*4\.jpg' is unreadable or corrupt: image file is trunc"):
        ds[4]
    flagged = LlavaDataset(good, root, ds.transform, keep_bad=True)[4]
    assert flagged["bad"] and flagged["pixel_values"].shape == (3, 32, 32)
