"""One writer per run directory: an advisory lock that names its holder.

``bnnslim binarize``, ``prune``, ``export`` and ``trust`` hold the lock of their
run directory while they run; a second command on the same directory stops at
once with an error naming the holder (command, process id, host, start time).
The lock is ``flock`` on a file beside the run directory (``.NAME.lock``, not
inside it, so that a fresh run directory stays empty): the kernel drops it when
its process ends, so a killed command never leaves a stale lock. Within one
process the lock is re-entrant (the Python API may call export inside prune's
process). Under torchrun only rank 0 takes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from bnnslim.errors import BnnslimError

_held: dict[Path, int] = {}  # lock file -> depth, in this process


def lock_path(run: Path) -> Path:
    run = Path(run).resolve()
    return run.parent / f".{run.name}.lock"


@contextlib.contextmanager
def run_lock(run: Path, command: str) -> Iterator[None]:
    """Hold ``run``'s lock for ``command`` (see the module docstring)."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    path = lock_path(run)
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise BnnslimError(f"cannot create the lock '{path}' of run '{run}': {exc.strerror or exc}",
                           "choose a run directory in a writable folder") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BnnslimError(f"run '{run}' is in use by {_holder(fd)}",
                               "wait for it to finish (or stop it), or use another --run DIR") from None
        holder = {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        _held[path] = 1
        try:
            yield
        finally:
            del _held[path]
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return (f"`bnnslim {info['command']}` (process {info['pid']} on {info['host']}, "
                f"since {info['since']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another bnnslim command"
