"""Atomic file writes: write beside the target, fsync, then rename over it.

A reader never sees a half-written file and an interrupted write leaves the old
file (if any) untouched. The new file gets the mode an ordinary ``open()`` would
give it (0666 less the umask), its data reaches the disk before the rename and
the rename reaches the disk after it. A temporary file is named
``.NAME.HOST.PID.XXXX.tmp``: one left behind by a process that was killed
(``kill -9``) on this host is removed by the next write of the same target.
A full disk or a refused write is a :class:`BnnslimError` naming the target.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bnnslim.errors import BnnslimError

_HOST = socket.gethostname().replace(".", "_") or "host"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove temporary files of ``target`` left by dead processes of this host; returns what was removed."""
    removed: list[Path] = []
    prefix = f".{target.name}.{_HOST}."
    try:
        candidates = [p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")]
    except OSError:
        return removed
    for path in candidates:
        pid_text = path.name[len(prefix):].split(".", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _alive(int(pid_text)):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


def _write_error(target: Path, exc: OSError) -> BnnslimError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return BnnslimError(f"no space left to write '{target}' (nothing was replaced)",
                            "free some disk space or choose another location, then run the command again")
    return BnnslimError(f"cannot write '{target}': {exc.strerror or exc}", "choose a writable location")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot open or sync a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; fsync it and rename it onto ``target`` on success."""
    target = Path(target)
    if target.is_dir():
        raise BnnslimError(f"'{target}' is a directory", "give the path of a file to write")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{_HOST}.{os.getpid()}.", suffix=".tmp",
                                        dir=target.parent)
    except OSError as exc:
        raise _write_error(target, exc) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        try:
            os.chmod(tmp, 0o666 & ~_umask())
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            raise _write_error(target, exc) from exc
        _fsync_dir(target.parent)
    except OSError as exc:  # raised by the writer inside the block
        raise _write_error(target, exc) from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(target: Path, text: str) -> None:
    """Write ``text`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``target`` atomically."""
    write_text(target, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_tensors(target: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save ``tensors`` as safetensors to ``target`` atomically (contiguous CPU copies)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(target) as tmp:
        try:
            save_file(plain, str(tmp), metadata=metadata)
        except SafetensorError as exc:  # safetensors reports I/O errors (a full disk) as its own type
            text = str(exc)
            if "No space left" in text or "Disk quota" in text:
                raise _write_error(target, OSError(errno.ENOSPC, "No space left on device")) from exc
            raise BnnslimError(f"cannot write '{target}': {text}", "choose a writable location") from exc
