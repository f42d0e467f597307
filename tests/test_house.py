"""The import graph of vlkit/ (tools/house.py): no circle, and no import from a room up to a higher floor."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _house():
    spec = importlib.util.spec_from_file_location("house", ROOT / "tools" / "house.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["house"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_module_has_a_floor_and_no_import_circles_or_points_up():
    house = _house()
    graph = house.rooms(ROOT)
    assert "vlkit.ablate.findings" in graph and "vlkit.config" in graph
    for name in graph:
        house.floor(name)  # a new module without a floor is named here
    assert house.cycles(graph) == []
    assert house.upward_arrows(graph) == []


def test_the_measure_sees_a_circle_and_an_arrow_up(tmp_path):
    """The checks above can fail: a config that imports the report, which imports config, is both."""
    house = _house()
    pkg = tmp_path / "vlkit"
    (pkg / "ablate").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "ablate" / "__init__.py").write_text("")
    (pkg / "config.py").write_text("def f():\n    from vlkit.ablate.report import write_report\n")
    (pkg / "ablate" / "report.py").write_text("from vlkit.config import load_recipe\n")
    graph = house.rooms(tmp_path)
    assert house.cycles(graph) == [["vlkit.ablate.report", "vlkit.config"]]
    assert house.upward_arrows(graph) == [("vlkit.config", 3, "vlkit.ablate.report", 8)]
