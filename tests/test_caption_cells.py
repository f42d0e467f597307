"""tools/caption_cells.py: align captions scored object by object (docs/examples/align_steps cites its figures)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _tools import load_tool

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    return load_tool("caption_cells")


def test_an_object_counts_on_colour_and_shape_separately_and_empty_cells_not_at_all():
    rec = {"reference": "northwest: purple circle, north: nothing, east: red square, south: blue cross",
           "prediction": "northwest: purple square, north: green circle, east: red square, south: nothing"}
    s = _tool().score([json.dumps(rec)])
    # 3 objects: purple circle (colour only), red square (both), blue cross (neither: the cell is called empty)
    assert s == {"objects": 3, "colour": pytest.approx(2 / 3), "shape": pytest.approx(1 / 3)}


def test_a_file_without_objects_or_with_a_bad_line_is_refused_naming_the_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="no object"):
        _tool().score([json.dumps({"reference": "all empty", "prediction": "x"}), ""])
    bad = tmp_path / "predictions_align.jsonl"
    bad.write_text(json.dumps({"reference": "north: red circle", "prediction": "north: red circle"}) + "\n{oops\n")
    assert _tool().main([str(bad)]) == 1
    assert "line 2: not a prediction record" in capsys.readouterr().err


def test_the_align_steps_study_figures_come_from_its_committed_captions():
    runs = ROOT / "docs" / "examples" / "align_steps" / "runs"
    got = {d.name: round(_tool().score((d / "predictions_align.jsonl").read_text().splitlines())["shape"], 3)
           for d in sorted(runs.iterdir())}
    assert got == {"max_steps-600_seed-0": 0.412, "max_steps-600_seed-1": 0.185, "max_steps-600_seed-2": 0.428,
                   "max_steps-1200_seed-0": 0.511, "max_steps-1200_seed-1": 0.479, "max_steps-1200_seed-2": 0.518}
