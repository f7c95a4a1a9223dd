"""Atomic file writes and the cross-process lock, the one implementation every cache, manifest, prompt file and state
file uses.

A file is written to a temporary sibling (``.<name>.<random>.tmp`` in the same folder, so the rename cannot cross
filesystems), flushed to disk, then renamed over the target: a reader sees the old file or the whole new one, never a
partial one. A write that fails part-way (a full disk, an unwritable folder) removes its temporary file and raises;
only a SIGKILL mid-write can leave one behind, and no reader ever opens a ``.tmp`` file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"


class CacheWriteError(OSError):
    """A cache entry (features, a few-shot manifest) could not be written: a full disk, an unwritable folder. The
    message is one line; the atomic write left nothing partial behind."""


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; renamed onto ``path`` when the block ends without error.

    Args:
        path: the target file (its folder must exist).
        mode: permissions of the new file (``mkstemp``'s 0600 would hide a shared cache from other users).
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the block: one process at a time, on this
    machine and on network filesystems that support ``flock``. Used so that concurrent trials, workers and sweeps
    compute each cache entry once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
