"""Score a toy-world run's align captions object by object: in how many of the scene's objects does the caption name
the right colour, and the right shape, in the object's own cell?

    python tools/caption_cells.py RUN_DIR/predictions_align.jsonl [...]

A toy-world caption names all nine cells in order (``northwest: purple circle, north: nothing, ...``); an object
counts as right on colour (shape) when the prediction names that cell with two words and the first (second) is the
reference's. Empty cells are not counted. Exact match over whole captions (what `vlkit train` prints for align) is
near 0 on this world, so it cannot show whether align has learnt shape; this can (docs/examples/align_steps).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def cells(caption: str) -> dict[str, list[str]]:
    """``"north: red circle, ..."`` -> {"north": ["red", "circle"], ...}"""
    out: dict[str, list[str]] = {}
    for part in caption.split(","):
        if ":" in part:
            cell, what = part.split(":", 1)
            out[cell.strip()] = what.strip().split()
    return out


def score(lines: list[str]) -> dict[str, float]:
    objects = colour = shape = 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ref, pred = cells(rec["reference"]), cells(rec["prediction"])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"line {n}: not a prediction record with 'reference' and 'prediction' ({exc})") from exc
        for cell, words in ref.items():
            if words == ["nothing"] or len(words) != 2:
                continue
            objects += 1
            said = pred.get(cell, [])
            colour += len(said) == 2 and said[0] == words[0]
            shape += len(said) == 2 and said[1] == words[1]
    if not objects:
        raise ValueError("no object in the references: is this a toy-world align predictions file?")
    return {"objects": objects, "colour": colour / objects, "shape": shape / objects}


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__)
        return 2
    for p in paths:
        path = Path(p)
        if not path.is_file():
            print(f"{p}: no such file (a run's align answers are RUN_DIR/predictions_align.jsonl)", file=sys.stderr)
            return 1
        try:
            s = score(path.read_text().splitlines())
        except ValueError as exc:
            print(f"{p}: {exc}", file=sys.stderr)
            return 1
        print(f"{p}: {s['objects']} objects, colour {s['colour']:.3f}, shape {s['shape']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
