"""Crash-safe file writes and small filesystem helpers (all blocking: call off the loop)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file.

    Temp file in the same directory, fsync, rename over the target, fsync the directory
    (the containers/storage ``AtomicWriteFile`` pattern).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def remove_tree(path: Path) -> None:
    """Remove a file or directory tree; a missing path is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def tree_usage(path: Path) -> tuple[int, int]:
    """Bytes (allocated blocks) and inodes used below ``path``, hardlinks counted once."""
    seen: set[tuple[int, int]] = set()
    used = inodes = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            inodes += 1
            used += st.st_blocks * 512
    return used, inodes


@dataclass(frozen=True)
class FsUsage:
    """What ImageFsInfo reports for one filesystem."""

    mountpoint: str
    used_bytes: int
    inodes_used: int
    timestamp_ns: int


def dir_usage(path: Path) -> FsUsage:
    used, inodes = tree_usage(path)
    return FsUsage(str(path), used, inodes, time.time_ns())
