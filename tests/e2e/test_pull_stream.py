"""Layers unpacked while they download: the verdicts that come only at the end of the stream.

A fresh layer download is piped into its unpack helper as it arrives. The layer may count
only once both the blob's digest checked and the helper succeeded; these tests break one
of the two after the helper has started working and check that nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from moorage.cri.v1 import api_pb2 as pb
from moorage.image.unpack import NICE
from moorage.image.unpacker import Unpacker, UnpackError
from tests.e2e.test_images import insecure_conf, pull, rpc_error
from tests.e2e.test_pull_failures import assert_store_clean
from tests.fixtures.daemon import Daemon
from tests.fixtures.oci import Image, Layer, push_image
from tests.fixtures.procs import pids_where
from tests.fixtures.registry import Registry

RegistryFactory = Callable[..., Registry]


@pytest.fixture
def daemon_for(tmp_path: Path) -> Iterator[Callable[[Registry], Daemon]]:
    started: list[Daemon] = []

    def start(registry: Registry) -> Daemon:
        d = Daemon(tmp_path / f"d{len(started)}", registries_conf_text=insecure_conf(registry))
        started.append(d)
        return d.start()

    yield start
    for d in started:
        d.stop()


def _unpack_helpers(d: Daemon) -> list[int]:
    """Pids of the unpack helpers working for this daemon (read from /proc)."""
    layers = str(d.root / "images/layers").encode()
    return pids_where(
        lambda a: b"moorage.image.unpack" in a and any(x.startswith(layers) for x in a))


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _stopped(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] == "T"


def test_digest_mismatch_at_the_end_discards_the_streamed_layer(
    daemon_for: Callable[[Registry], Daemon], fresh_registry: RegistryFactory
) -> None:
    """The registry serves a blob that unpacks fine, to the very diff_id the config names,
    but is not the blob the manifest names: only the digest check at the end of the
    download can tell. The helper's finished layer must be thrown away."""
    reg = fresh_registry()
    layer = Layer()
    layer.add_file("data", os.urandom(3 << 20))  # several pipe-fulls: streamed for real
    blob = layer.build("gzip")
    push_image(reg, "stream/mismatch", "1", Image(layers=[blob], labels={"t": "mismatch"}))
    # Same length, same uncompressed tar: only the gzip header's mtime differs.
    other = bytearray(blob.data)
    other[4] ^= 0xFF
    reg.corrupt_blob(blob.digest, "replace", data=bytes(other))
    d = daemon_for(reg)
    e = rpc_error(pull, d, reg.ref("stream/mismatch", "1"))
    assert e.code() == grpc.StatusCode.DATA_LOSS, e.details()
    assert blob.digest in (e.details() or "") and "corrupt" in (e.details() or "")
    assert_store_clean(d)
    assert not list((d.root / "images/layers").glob(".tmp-*"))
    assert _unpack_helpers(d) == []


def test_helper_killed_mid_stream_leaves_nothing(
    daemon_for: Callable[[Registry], Daemon], registry: Registry
) -> None:
    """The helper is frozen mid-stream (the download waits on its pipe), then killed: the
    download still completes and is checked, the pull fails clearly, and no layer, temp
    directory or download is left."""
    layer = Layer()
    for i in range(4):
        layer.add_file(f"f{i}", os.urandom(16 << 20))  # far more than pipe and buffers hold
    image = Image(layers=[layer.build("none")], labels={"t": "kill-helper"})
    push_image(registry, "stream/killed", "1", image)
    d = daemon_for(registry)
    errors: list[grpc.RpcError] = []

    def bg() -> None:
        try:
            pull(d, registry.ref("stream/killed", "1"))
        except grpc.RpcError as e:
            errors.append(e)

    t = threading.Thread(target=bg)
    t.start()
    helpers: list[int] = []
    try:
        def helper_started() -> bool:
            helpers[:] = _unpack_helpers(d)
            return bool(helpers)

        _wait_for("the unpack helper", helper_started)
        (pid,) = helpers
        os.kill(pid, signal.SIGSTOP)
        _wait_for("the helper to stop", lambda: _stopped(pid))
        ingest = d.root / "images/ingest"
        # The helper is started first, the download right after it.
        _wait_for("the download", lambda: any(ingest.iterdir()))
        partial = next(iter(ingest.iterdir()), None)
        assert partial is not None, "the layer is not downloading while the helper works"
        assert partial.stat().st_size < len(image.layers[0].data)
        tmp_dirs = list((d.root / "images/layers").glob(".tmp-*"))
        assert len(tmp_dirs) == 1
        os.kill(pid, signal.SIGKILL)
    finally:
        for pid in helpers:  # never leave a stopped helper behind, whatever failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        t.join(timeout=120)
    assert not t.is_alive()
    (e,) = errors
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e.details()
    assert image.layers[0].digest in (e.details() or "")
    assert "-9" in (e.details() or "")
    assert not d.images.ListImages(pb.ListImagesRequest()).images
    assert not list((d.root / "images/layers").glob(".tmp-*"))
    assert list((d.root / "images/ingest").iterdir()) == []
    assert _unpack_helpers(d) == []
    # The next pull streams anew and succeeds.
    assert pull(d, registry.ref("stream/killed", "1")).startswith("sha256:")


async def test_helper_reads_a_pipe_and_yields_the_cpu(tmp_path: Path) -> None:
    """The helper as a pull starts it: stdin a pipe, the layer written as it comes. It
    lowers its CPU priority first; the end of the pipe is the end of the layer."""
    read_fd, write_fd = os.pipe()
    try:
        helper = await Unpacker.start(read_fd, tmp_path / "layer", "none", name="piped")
    finally:
        os.close(read_fd)
    try:
        own = os.getpriority(os.PRIO_PROCESS, 0)
        deadline = time.monotonic() + 60
        while os.getpriority(os.PRIO_PROCESS, helper.pid) != min(19, own + NICE):
            assert time.monotonic() < deadline, "the helper never lowered its priority"
            await asyncio.sleep(0.02)
        layer = Layer()
        layer.add_file("hello", b"world")
        data = layer.tar_bytes()
        for i in range(0, len(data), 1000):  # in pieces, as a download arrives
            os.write(write_fd, data[i : i + 1000])
            await asyncio.sleep(0)
    finally:
        os.close(write_fd)
    try:
        result = await helper.result()
    finally:
        await helper.kill()
    assert result.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    assert (tmp_path / "layer/hello").read_bytes() == b"world"


async def test_helper_refuses_a_pipe_that_ends_early(tmp_path: Path) -> None:
    layer = Layer()
    layer.add_file("big", os.urandom(1 << 20))
    data = layer.tar_bytes()
    read_fd, write_fd = os.pipe()
    try:
        helper = await Unpacker.start(read_fd, tmp_path / "layer", "none", name="cut")
    finally:
        os.close(read_fd)
    try:
        os.write(write_fd, data[: len(data) // 3])
    finally:
        os.close(write_fd)
    with pytest.raises(UnpackError, match="cut refused: .*ends inside"):
        await helper.result()
