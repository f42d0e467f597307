"""Advisory file locks: one for everything that builds shared files (toy world, feature cache), and the lock a
live run holds on its run directory (so that a second `vlkit ablate` or `vlkit train` leaves it alone)."""
from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: no locking
    fcntl = None  # type: ignore[assignment]


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive POSIX advisory lock on ``path`` (created if needed); a no-op where fcntl is missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---- run directories: a live run holds its directory's lock ---------------------------------------------------------
RUN_LOCK = ".vlkit-run.lock"  # in the run directory; holds "host pid start-time" of the process that took it
INHERITED_ENV = "VLKIT_RUN_LOCK_HELD"  # set by a parent that holds the lock for the `vlkit train` child it starts


class RunBusyError(ValueError):
    """Another live process holds a run directory; the message names it and the holder."""


def run_lock_path(run_dir: Path) -> Path:
    return Path(run_dir) / RUN_LOCK


def try_lock_run(run_dir: Path, attempts: int = 20, wait_s: float = 0.05) -> int | None:
    """An open file descriptor holding ``run_dir``'s exclusive lock, or None while another process holds it.

    ``flock`` locks die with their holder (also on ``kill -9``), so a lock never outlives a dead run; a child
    started with the descriptor (``pass_fds``) holds it too. A few quick retries let a status probe (which takes
    the lock for microseconds, see :func:`run_is_live`) pass."""
    path = run_lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is None:  # pragma: no cover - non-POSIX
        return fd
    for attempt in range(attempts):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if attempt + 1 < attempts:
                time.sleep(wait_s)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()} {time.time():.0f}\n".encode())
        return fd
    os.close(fd)
    return None


def release_run(fd: int) -> None:
    """Give a run directory's lock back (closing the descriptor; a child that inherited it may still hold it)."""
    os.close(fd)


def run_is_live(run_dir: Path) -> bool:
    """Whether a live process holds ``run_dir``'s lock (a non-blocking probe, released at once)."""
    path = run_lock_path(run_dir)
    if fcntl is None or not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the probe's own lock
    return False


def run_holder(run_dir: Path) -> str:
    """'host H, pid P' of the process that took ``run_dir``'s lock last (for messages)."""
    try:
        host, pid, _ = run_lock_path(run_dir).read_text().split()
    except (OSError, ValueError):
        return "holder unknown"
    return f"host {host}, pid {pid}"


def hold_run_dir(run_dir: Path) -> int | None:
    """Take ``run_dir``'s lock for a `vlkit train` process (None: its parent, a grid worker, holds it for it).

    Raises :class:`RunBusyError` naming the holder when another live process has it."""
    if os.environ.get(INHERITED_ENV) == str(Path(run_dir).resolve()):
        return None
    fd = try_lock_run(run_dir)
    if fd is None:
        raise RunBusyError(f"run directory {run_dir} is in use by another process ({run_holder(run_dir)}): a "
                           "`vlkit train` or grid run is training it. Wait for it to end (or stop it), or choose "
                           "another --run-dir")
    return fd
