"""Container root filesystems (overlayfs over image layers) and their usage accounting."""

from __future__ import annotations

import asyncio
from pathlib import Path

from moorage.storage.overlay import ContainerStorage, RootFs
from moorage.util.fs import FsUsage, dir_usage

__all__ = ["ContainerStorage", "RootFs", "container_fs_usage"]


async def container_fs_usage(path: Path) -> FsUsage:
    """Usage of the filesystem holding containers' writable layers (ImageFsInfo)."""
    return await asyncio.to_thread(_usage, path)


def _usage(path: Path) -> FsUsage:
    path.mkdir(parents=True, exist_ok=True)
    return dir_usage(path)
