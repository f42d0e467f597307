"""The metrics log of a run: ``metrics.jsonl``, one JSON line per optimizer step and per evaluation."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlkit._atomic import StateError, write_text_atomic


class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl``; each line is flushed so a killed run keeps its log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:  # TensorBoard is optional
            self.tb = None

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None and "step" in row:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{row.get('stage', '')}/{k}", v, row["step"])

    def truncate_after(self, stage: str, step: int) -> None:
        """Drop lines logged after the checkpoint we resume from (they will be written again), and a last line
        cut short by a kill during its append (it was logged after that checkpoint)."""
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        keep = []
        for n, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                if n == len(lines):
                    continue
                raise StateError(f"{self.path} line {n} is not valid JSON ({exc}); only the last line can be cut "
                                 "short by a kill. Delete or repair that line and run again") from None
            if row.get("stage") == stage and row.get("step", 0) > step:
                continue
            keep.append(line)
        write_text_atomic(self.path, "".join(l + "\n" for l in keep))


class NullLog(MetricsLog):
    """The log of ranks other than 0 in a distributed run: writes nothing."""

    def __init__(self) -> None:
        self.path, self.tb = None, None

    def write(self, row: dict[str, Any]) -> None:
        pass

    def truncate_after(self, stage: str, step: int) -> None:
        pass
