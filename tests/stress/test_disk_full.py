"""A full disk: during a pull (the daemon's root on a small tmpfs) and while a container
writes its log (the pod's log directory on a small tmpfs).

The pull fails with RESOURCE_EXHAUSTED naming the full disk, leaves no partial layer or
download behind, and the next pull succeeds once space is freed. A container whose log
cannot be written keeps running; its log goes on, in whole lines, once there is room.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from moorage.cri.v1 import api_pb2 as pb
from tests.e2e.test_containers import LOG_LINE, Env
from tests.e2e.test_images import insecure_conf
from tests.e2e.test_sandboxes import rpc_error
from tests.fixtures.daemon import Daemon
from tests.fixtures.oci import Image, Layer, busybox_layer_builder, push_image
from tests.fixtures.registry import Registry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
MIB = 1 << 20


@contextlib.contextmanager
def small_tmpfs(path: Path, mib: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0755", "tmpfs",
                    str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _resize(path: Path, mib: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={mib}m", str(path)], check=True)


@pytest.fixture(scope="module")
def big_ref(registry: Registry) -> str:
    """busybox plus a 12 MiB layer of random bytes (gzip cannot shrink it)."""
    big = Layer().add_dir("data")
    for i in range(3):
        big.add_file(f"data/f{i}", os.urandom(4 * MIB))
    image = Image(layers=[busybox_layer_builder().build("gzip"), big.build("gzip")],
                  labels={"suite": "disk-full"})
    push_image(registry, "stress/disk-full", "1", image)
    return registry.ref("stress/disk-full", "1")


def test_pull_on_a_full_disk(tmp_path: Path, registry: Registry, big_ref: str) -> None:
    with small_tmpfs(tmp_path / "disk", 16) as disk:
        d = Daemon(tmp_path / "d", registries_conf_text=insecure_conf(registry))
        d.extra_args = ["--root", str(disk / "root")]
        d.start()
        try:
            spec = pb.ImageSpec(image=big_ref)
            e = rpc_error(lambda: d.images.PullImage(pb.PullImageRequest(image=spec),
                                                     timeout=120))
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
            assert "No space left on device" in (e.details() or ""), e.details()
            assert not d.images.ListImages(pb.ListImagesRequest()).images
            images = disk / "root" / "images"

            def partial() -> list[str]:
                return [p.name for p in (images / "layers").iterdir()
                        if p.name.startswith(".tmp")] + os.listdir(images / "ingest")

            # No partial layer and no partial download is left to fill the disk (the
            # image's other layers, whose downloads go on after the call failed, finish
            # or fail on their own: polled).
            deadline = time.monotonic() + 30
            while partial() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert partial() == []
            # Space freed: the same pull succeeds.
            _resize(disk, 64)
            ref = d.images.PullImage(pb.PullImageRequest(image=spec), timeout=120).image_ref
            assert d.images.ImageStatus(pb.ImageStatusRequest(image=spec)).image.id == ref
            d.images.RemoveImage(pb.RemoveImageRequest(image=spec))
        finally:
            d.stop()


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")


def test_container_log_on_a_full_disk(env: Env, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "logs", 2) as logs:
        filler = logs / "filler"
        filler.write_bytes(b"\0" * (2 * MIB - 48 * 1024))
        pod = env.pod("chatty")  # its log directory is <tmp>/logs/chatty
        cid = env.run(pod, "talker", ["sh", "-c",
                                      "i=0; while true; do i=$((i+1)); "
                                      "echo line $i padded with some words to fill the disk; "
                                      "sleep 0.005; done"])
        log = Path(env.status(cid).status.log_path)
        deadline = time.monotonic() + 30
        while os.statvfs(logs).f_bavail > 0:
            assert time.monotonic() < deadline, "the log never filled the disk"
            time.sleep(0.05)
        time.sleep(1)  # writes fail for a while
        st = env.status(cid).status
        assert st.state == pb.CONTAINER_RUNNING
        assert env.exec(cid, ["true"]).exit_code == 0
        before = _last_number(log)
        filler.unlink()
        deadline = time.monotonic() + 30
        while _last_number(log) <= before + 10:
            assert time.monotonic() < deadline, "the log never went on after space was freed"
            time.sleep(0.05)
        assert env.status(cid).status.state == pb.CONTAINER_RUNNING
        # Whole CRI lines only: a line cut by the full disk is ended, never glued to the
        # next one (kubelet parses the file line by line).
        lines = [ln for ln in _lines(log) if ln]
        glued = [ln for ln in lines if len(re.findall(rb" stdout [PF] ", ln)) > 1]
        assert glued == [], glued[:3]
        # At most the one line cut inside its time stamp cannot be parsed.
        bad = [ln for ln in lines[:-1] if not LOG_LINE.match(ln)]
        assert len(bad) <= 1, bad[:3]
        env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
        env.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod))


def _last_number(log: Path) -> int:
    found = re.findall(rb"stdout F line (\d+) ", log.read_bytes()[-4096:])
    return int(found[-1]) if found else 0
