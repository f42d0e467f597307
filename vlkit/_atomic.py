"""State files that a later process reads back, written so that a kill never leaves a half-written one.

Every such file (a run's ``summary.json``, a grid point's ``status.json``, ``plan.json``, the feature cache's
``meta.json`` and shard indexes, ...) goes through :func:`write_text_atomic`: the text is written to a temporary
file in the same directory, flushed and fsynced, then ``os.replace``-d over the target, so a reader sees the old
file or the new one, never a truncated mix. :func:`read_json` reads one back and names the file when it is not
valid JSON (written by an older vlkit in place, or damaged on disk).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


class StateError(ValueError):
    """A state file is unreadable; the message names the file and what to do."""


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` atomically (temp file in the same directory + fsync + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any, indent: int | None = 1) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent))


def read_json(path: Path, remedy: str) -> Any:
    """``path`` parsed as JSON; a :class:`StateError` naming the file, the parse error and ``remedy`` otherwise."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StateError(f"{path} is not valid JSON ({exc}); it was cut short or damaged. {remedy}") from None
