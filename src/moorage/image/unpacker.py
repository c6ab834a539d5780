"""Unpack a layer blob into a directory, through the chrooted helper program.

The daemon never parses a layer itself: :class:`Unpacker` fork+execs
``python -m moorage.image.unpack`` (see that package) with the compressed layer as its stdin
(a blob file, or a pipe the layer is written into as it downloads), and turns its one-line
JSON answer into an :class:`UnpackResult` or an :class:`UnpackError`. :func:`unpack_layer`
does it for a blob file.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from moorage.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from moorage.util.fs import NO_SPACE
from moorage.util.helper import helper_env
from moorage.util.proc import PIPE, Process, spawn

Compression = Literal["gzip", "zstd", "none"]

HELPER_MODULE = "moorage.image.unpack"
#: Exit code of the helper when it refused the layer (1 is a failure of the machine).
EXIT_REFUSED = 2
#: Exit code of the helper when the layer passed a configured bound (size, entries).
EXIT_LIMIT = 3
_STDERR_TAIL = 2000

#: Layer media types (OCI image-spec, Docker image manifest v2.2 and the Docker zstd type
#: that containerd and moby write), by compression.
_LAYER_MEDIA_TYPES: dict[str, Compression] = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",  # containerd and moby use it
    "application/vnd.docker.image.rootfs.foreign.diff.tar": "none",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}


@dataclass(frozen=True)
class UnpackResult:
    diff_id: str  # "sha256:<hex>" of the uncompressed tar stream
    size: int  # bytes of the uncompressed tar stream
    entries: int  # tar members applied


class UnpackError(FailedPrecondition):
    """The layer could not be unpacked; the message says which rule it broke, or what failed."""


class LayerNoSpace(ResourceExhausted):
    """The disk (or quota) of the layer directory filled up while the layer was unpacked."""


class LayerTooLarge(ResourceExhausted):
    """The layer passed ``max_layer_size`` or ``max_layer_entries``.

    RESOURCE_EXHAUSTED rather than FAILED_PRECONDITION: the layer broke no rule, it is over
    a quota the operator set, and raising the quota makes the same pull work.
    """


def compression_for_media_type(media_type: str) -> Compression:
    """The compression of a layer with this media type (parameters and case are ignored)."""
    key = media_type.split(";", 1)[0].strip().lower()
    try:
        return _LAYER_MEDIA_TYPES[key]
    except KeyError:
        raise InvalidArgument(f"unsupported layer media type {media_type!r}") from None


async def unpack_layer(
    blob: Path,
    dest: Path,
    compression: Compression,
    *,
    max_size: int | None = None,
    max_entries: int | None = None,
    name: str | None = None,
) -> UnpackResult:
    """Unpack the layer ``blob`` into ``dest`` (created if missing; it must be empty).

    Errors name the layer ``name`` (its digest, say), else the blob's file name.

    The result's ``diff_id`` is for the caller to check against the image config. On failure
    ``dest`` keeps whatever was written: unpack into a temporary directory and remove it.
    If the awaiting task is cancelled, the helper is killed and reaped before this returns.
    """
    _check_args(compression, max_size, max_entries)
    # A few syscalls: not worth a thread (whose cancellation would leak the fd).
    blob_fd = _open_blob(blob)
    try:
        helper = await Unpacker.start(
            blob_fd, dest, compression, max_size=max_size, max_entries=max_entries,
            name=name or blob.name,
        )
    finally:
        os.close(blob_fd)
    return await helper.result()


class Unpacker:
    """One running helper, reading the compressed layer from a file or a pipe.

    :meth:`start` forks the helper with ``source_fd`` as its stdin (the caller keeps its
    own copy of the fd and closes it); :meth:`result` waits for the answer. A layer can so
    be unpacked while it downloads: give :meth:`start` the read end of a pipe and write the
    blob into the other end as it arrives. Until :meth:`result` returned, whoever started
    the helper must end it with :meth:`kill` on every error path.
    """

    def __init__(self, proc: Process, name: str) -> None:
        self._proc = proc
        self._name = name

    @classmethod
    async def start(
        cls,
        source_fd: int,
        dest: Path,
        compression: Compression,
        *,
        max_size: int | None = None,
        max_entries: int | None = None,
        name: str,
    ) -> Unpacker:
        """Start unpacking what ``source_fd`` reads into ``dest`` (created if missing; it
        must be empty). Errors name the layer ``name``."""
        _check_args(compression, max_size, max_entries)
        dest = _empty_dest(dest)
        argv = [
            sys.executable,
            "-P",  # never import from the daemon's working directory
            "-m",
            HELPER_MODULE,
            "--dest",
            str(dest),
            "--compression",
            compression,
        ]
        if max_size is not None:
            argv += ["--max-size", str(max_size)]
        if max_entries is not None:
            argv += ["--max-entries", str(max_entries)]
        proc = await spawn(argv, stdin=source_fd, stdout=PIPE, stderr=PIPE, cwd="/",
                           env=helper_env())
        return cls(proc, name)

    @property
    def pid(self) -> int:
        return self._proc.pid

    async def result(self) -> UnpackResult:
        """The helper's answer: an :class:`UnpackResult`, or :class:`UnpackError` /
        :class:`LayerTooLarge`. If the awaiting task is cancelled, the helper is killed
        and reaped before this returns."""
        try:
            stdout, stderr = await self._proc.communicate()
        except BaseException:  # cancelled (or the pipes failed): the helper must not run on
            await self.kill()
            raise
        return _parse_answer(self._name, self._proc.returncode, stdout, stderr)

    async def kill(self) -> None:
        """Kill the helper (if it still runs) and reap it; idempotent."""
        proc = self._proc
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # it may have just exited
                proc.kill()
        # A second cancellation while reaping still leaves the helper killed.
        await proc.wait()


def _check_args(compression: str, max_size: int | None, max_entries: int | None) -> None:
    if compression not in ("gzip", "zstd", "none"):
        raise InvalidArgument(f"unknown layer compression {compression!r}")
    if max_size is not None and max_size < 0:
        raise InvalidArgument(f"max_size must not be negative, got {max_size}")
    if max_entries is not None and max_entries < 0:
        raise InvalidArgument(f"max_entries must not be negative, got {max_entries}")


def _open_blob(blob: Path) -> int:
    try:
        return os.open(blob, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise UnpackError(f"cannot open layer blob {blob}: {e.strerror}") from None


def _empty_dest(dest: Path) -> Path:
    """``dest`` made absolute, created if missing; refused unless empty."""
    dest = dest.absolute()
    try:
        dest.mkdir(parents=True, exist_ok=True)
        if any(dest.iterdir()):
            raise UnpackError(f"layer directory {dest} is not empty")
    except OSError as e:
        raise UnpackError(f"cannot use layer directory {dest}: {e.strerror}") from None
    return dest


def _parse_answer(name: str, returncode: int | None, stdout: bytes, stderr: bytes) -> UnpackResult:
    answer: object = None
    lines = stdout.strip().splitlines()
    if lines:
        with contextlib.suppress(ValueError):
            answer = json.loads(lines[-1])
    if returncode == 0 and isinstance(answer, dict):
        try:
            return UnpackResult(
                diff_id=str(answer["diff_id"]),
                size=int(answer["size"]),
                entries=int(answer["entries"]),
            )
        except (KeyError, TypeError, ValueError):
            pass
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        error = _cut(answer["error"])
        if returncode == EXIT_LIMIT:
            raise LayerTooLarge(f"layer {name} refused: {error}")
        if answer.get("errno") in NO_SPACE:
            raise LayerNoSpace(f"layer {name} failed: the image store's disk is full: {error}")
        verdict = "refused" if returncode == EXIT_REFUSED else "failed"
        raise UnpackError(f"layer {name} {verdict}: {error}")
    tail = stderr.decode("utf-8", "replace").strip()[-_STDERR_TAIL:]
    raise UnpackError(
        f"layer unpack helper for {name} exited with {returncode} and no answer: {tail}"
    )


def _cut(text: str, keep: int = _STDERR_TAIL) -> str:
    """The helper's error, cut in the middle if a hostile layer made it long."""
    if len(text) <= keep:
        return text
    return f"{text[: keep // 2]} [...] {text[-keep // 2 :]}"
