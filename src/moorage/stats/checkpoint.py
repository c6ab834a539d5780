"""CheckpointContainer: a running container's state exported with CRIU, through runc.

``<runtime> checkpoint --image-path <tmp>/checkpoint --work-path <tmp> --leave-running <id>``
dumps the processes (the container keeps running), then one tar archive is written to the
requested location, with the names CRI-O's archives use, so the tools that read those
(``checkpointctl``) understand ours:

- ``checkpoint/``: CRIU's image files;
- ``spec.dump``: the container's OCI spec (``config.json``);
- ``config.dump``: what CRI knows of the container (id, name, image, pod, times);
- ``rootfs-diff.tar``: the writable layer (a tar of its upper directory);
- ``dump.log``: CRIU's log.

Needs the ``criu`` binary (Debian's ``criu`` package), which runc runs: without it the RPC
answers UNIMPLEMENTED saying so. The archive appears atomically (written beside the target
and renamed), and the temporary files go whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from moorage import log
from moorage.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    Unimplemented,
)
from moorage.oci.runtime import OciRuntime, parse_runc_error
from moorage.util.fs import fsync_dir, remove_tree

__all__ = ["CheckpointRequest", "checkpoint", "criu_path"]

_log = log.get("moorage.checkpoint")
#: When the request gives no timeout (CRI: 0 means the runtime's default).
DEFAULT_TIMEOUT = 300.0
#: How much of CRIU's log an error message carries.
LOG_TAIL = 1500


@dataclass(frozen=True)
class CheckpointRequest:
    container_id: str
    name: str
    sandbox_id: str
    image: str
    image_ref: str
    created_at: int
    labels: dict[str, str]
    annotations: dict[str, str]
    bundle: Path  # holds config.json
    upper: Path  # the writable layer
    location: str
    timeout: float = 0.0


def criu_path() -> str | None:
    """Where ``criu`` is, as runc will find it (PATH, plus the sbin dirs Debian uses)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/local/sbin"
    return shutil.which("criu", path=path)


def _target(location: str) -> Path:
    if not location:
        raise InvalidArgument("location is required: the path of the archive to write")
    target = Path(location)
    if not target.is_absolute():
        raise InvalidArgument(f"location {location!r} must be an absolute path")
    if target.is_dir():
        raise InvalidArgument(f"location {location!r} is a directory; name the archive file")
    return target


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if "Error" in ln or "error" in ln] or \
        text.splitlines()[-5:]
    return "\n".join(lines)[-LOG_TAIL:]


async def _run(argv: list[str], timeout: float) -> tuple[int, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )
    try:
        async with asyncio.timeout(timeout):
            _, err = await proc.communicate()
    except BaseException:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, err


def _config_dump(req: CheckpointRequest) -> bytes:
    return json.dumps({
        "id": req.container_id, "name": req.name, "podSandboxId": req.sandbox_id,
        "rootfsImageName": req.image, "rootfsImageRef": req.image_ref,
        "createdTime": req.created_at, "checkpointedTime": time.time_ns(),
        "labels": req.labels, "annotations": req.annotations,
    }, indent=2).encode()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


def _export(req: CheckpointRequest, work: Path, images: Path, target: Path) -> None:
    diff = work / "rootfs-diff.tar"
    with tarfile.open(diff, "w", format=tarfile.PAX_FORMAT) as tar:
        if req.upper.is_dir():
            for entry in sorted(os.listdir(req.upper)):
                tar.add(req.upper / entry, arcname=entry)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                tar.add(images, arcname="checkpoint")
                spec = req.bundle / "config.json"
                if spec.exists():
                    tar.add(spec, arcname="spec.dump")
                _add_bytes(tar, "config.dump", _config_dump(req))
                tar.add(diff, arcname="rootfs-diff.tar")
                if (work / "dump.log").exists():
                    tar.add(work / "dump.log", arcname="dump.log")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


async def checkpoint(runtime: OciRuntime, req: CheckpointRequest) -> Path:
    """Dump the running container ``req.container_id`` and write its archive; returns the
    archive's path."""
    if criu_path() is None:
        raise Unimplemented(
            "CheckpointContainer needs CRIU, and the criu binary is not installed "
            "(Debian package criu)"
        )
    target = _target(req.location)
    await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True, mode=0o700)
    work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=".checkpoint-",
                                        dir=target.parent))
    images = work / "checkpoint"
    timeout = req.timeout if req.timeout > 0 else DEFAULT_TIMEOUT
    log_ = _log.bind(container_id=req.container_id, location=str(target))
    try:
        await asyncio.to_thread(images.mkdir, mode=0o700)
        argv = runtime.argv("checkpoint", "--image-path", str(images), "--work-path",
                            str(work), "--leave-running", req.container_id)
        try:
            code, err = await _run(argv, timeout)
        except TimeoutError:
            raise DeadlineExceeded(
                f"checkpoint of container {req.container_id} did not finish within "
                f"{timeout:g}s"
            ) from None
        if code != 0:
            # runc names its log file, which goes with the temporary directory.
            detail = "; ".join(line for line in parse_runc_error(err).splitlines()
                               if line and not line.startswith("log file:"))
            detail = detail or f"exit status {code}"
            criu_log = await asyncio.to_thread(_tail, work / "dump.log")
            log_.warning("checkpoint.failed", error=detail, criu_log=criu_log)
            raise FailedPrecondition(
                f"checkpoint of container {req.container_id} failed: {detail}"
                + (f"; CRIU's log: {criu_log}" if criu_log else "")
            )
        await asyncio.to_thread(_export, req, work, images, target)
        log_.info("checkpoint.written")
        return target
    finally:
        await asyncio.shield(asyncio.to_thread(remove_tree, work))
