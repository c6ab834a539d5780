"""The daemon as kubelet and crictl meet it: started from its CLI, driven over its socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from moorage.cri.v1 import api_pb2 as pb
from tests.fixtures.daemon import Daemon


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "d").start()
    yield d
    d.stop()


def _moorage(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "moorage", *args],
                          capture_output=True, text=True, timeout=60)


def test_version_status_runtime_config(daemon: Daemon) -> None:
    v = daemon.runtime.Version(pb.VersionRequest(version="0.1.0"))
    assert (v.runtime_name, v.runtime_api_version, v.version) == ("moorage", "v1", "0.1.0")
    assert v.runtime_version
    status = daemon.runtime.Status(pb.StatusRequest(verbose=True))
    conditions = {c.type: c for c in status.status.conditions}
    assert conditions["RuntimeReady"].status is True
    assert conditions["NetworkReady"].status is False
    assert conditions["NetworkReady"].reason and conditions["NetworkReady"].message
    info = json.loads(status.info["config"])
    assert info["api"]["listen"] == str(daemon.socket)
    assert info["root"] == str(daemon.root)
    assert not daemon.runtime.Status(pb.StatusRequest()).info
    rc = daemon.runtime.RuntimeConfig(pb.RuntimeConfigRequest())
    assert rc.linux.cgroup_driver == pb.CGROUPFS


def test_socket_mode_and_large_messages(daemon: Daemon) -> None:
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o660
    # A 15 MiB request is accepted (kubelet sends up to 16 MiB); it is just an unknown image.
    big = pb.ImageStatusRequest(image=pb.ImageSpec(image="x", annotations={"a": "b" * (15 << 20)}))
    assert not daemon.images.ImageStatus(big).HasField("image")


def test_each_call_logs_one_event_with_ids(daemon: Daemon) -> None:
    daemon.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image="busybox:1.0")))
    lines = [ln for ln in daemon.log_path.read_text().splitlines() if "method=ImageStatus" in ln]
    assert len(lines) == 1
    assert "image=busybox:1.0" in lines[0] and "code=OK" in lines[0]
    assert "duration_ms=" in lines[0]


def test_second_daemon_refused_and_stale_socket_replaced(tmp_path: Path) -> None:
    first = Daemon(tmp_path / "d").start()
    try:
        second = subprocess.run(Daemon(tmp_path / "d").args(), capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 1
        assert "another daemon is already serving" in second.stderr
    finally:
        first.kill9()
    # kill -9 leaves the socket file behind: the next start replaces it.
    assert first.socket.exists()
    again = first.start()
    again.runtime.Version(pb.VersionRequest())
    assert again.stop() == 0
    assert not again.socket.exists()


def test_live_socket_of_another_program_refused(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "d")
    d.socket.parent.mkdir(parents=True)
    # Another program serving the socket path, with a different runroot lock.
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(d.socket))
    listener.listen()
    d.extra_args = ["--runroot", str(tmp_path / "other-run")]
    try:
        out = subprocess.run(d.args(), capture_output=True, text=True, timeout=60)
        assert out.returncode == 1
        assert "another daemon is already serving" in out.stderr
    finally:
        listener.close()
        os.unlink(d.socket)


def test_sigterm_is_clean(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "d").start()
    assert d.stop() == 0
    assert not d.socket.exists()
    assert "daemon.stopped" in d.log_path.read_text()


def test_bad_config_stops_the_start_naming_the_key(tmp_path: Path) -> None:
    conf = tmp_path / "m.toml"
    conf.write_text("[image]\nmax_concurent_downloads = 3\n")
    out = _moorage("--config", str(conf), "--config-dir", str(tmp_path), "config")
    assert out.returncode == 2
    assert "image.max_concurent_downloads" in out.stderr


def test_config_and_version_commands(tmp_path: Path) -> None:
    out = _moorage("--config", "/dev/null", "--config-dir", str(tmp_path),
                   "--listen", "/tmp/x.sock", "config")
    assert out.returncode == 0
    assert 'listen = "/tmp/x.sock"' in out.stdout and out.stdout.count("# ") > 5
    out = _moorage("version")
    assert out.returncode == 0
    assert "moorage 0.1.0" in out.stdout and "CRI API v1" in out.stdout
    assert "git commit" in out.stdout


def test_json_log_format(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "d", extra_args=["--log-format", "json"]).start()
    try:
        d.runtime.Version(pb.VersionRequest())
    finally:
        d.stop()
    events = [json.loads(ln) for ln in d.log_path.read_text().splitlines() if ln.startswith("{")]
    calls = [e for e in events if e.get("event") == "cri.call"]
    assert calls and calls[0]["method"] == "Version" and calls[0]["code"] == "OK"


def test_sighup_reloads_live_options(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "d").start()
    try:
        drop = d.base / "moorage.d" / "50-reload.toml"
        drop.write_text('log_level = "warning"\n[runtimes.alt]\nruntime_path = "runc"\n'
                        "[image]\nmax_concurrent_downloads = 7\n")
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        # The handlers change first, the reload's log event comes at its end.
        deadline = time.monotonic() + 30
        while True:
            handlers = {h.name for h in d.runtime.Status(pb.StatusRequest()).runtime_handlers}
            text = d.log_path.read_text()
            if ("alt" in handlers and "daemon.reloaded" in text) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert "alt" in handlers
        assert "daemon.reloaded" in text and "image.max_concurrent_downloads" in text
    finally:
        d.stop()


def test_sighup_changes_the_log_level(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "d", log_level=None).start()  # info, from the defaults
    try:
        d.runtime.Version(pb.VersionRequest())
        assert "method=Version" in d.log_path.read_text()  # an OK call logs at info
        (d.base / "moorage.d" / "50-quiet.toml").write_text('log_level = "warning"\n')
        d.reload()
        before = d.log_path.read_text()
        d.runtime.Version(pb.VersionRequest())
        with pytest.raises(grpc.RpcError) as e:
            d.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=""))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        deadline = time.monotonic() + 30
        while "method=ContainerStatus" not in d.log_path.read_text()[len(before):]:
            assert time.monotonic() < deadline, "no warning for the refused call"
            time.sleep(0.05)
        after = d.log_path.read_text()[len(before):]
        assert "method=Version" not in after  # info is below the new level
    finally:
        d.stop()


def test_sd_notify_ready(tmp_path: Path) -> None:
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(20)
    os.environ["NOTIFY_SOCKET"] = str(notify)
    try:
        d = Daemon(tmp_path / "d").start()
    finally:
        del os.environ["NOTIFY_SOCKET"]
    try:
        assert sock.recv(100) == b"READY=1"
    finally:
        d.stop()
        sock.close()


def test_sighup_probes_the_cgroups_again(tmp_path: Path) -> None:
    """What the node's cgroups can enforce is probed at start and again on SIGHUP: here a
    huge page size appears (the daemon runs in a mount namespace of its own, where a test
    directory stands in for /sys/kernel/mm/hugepages)."""
    pages = tmp_path / "hugepages"
    (pages / "hugepages-2048kB").mkdir(parents=True)
    d = Daemon(tmp_path / "d", extra_args=["--log-format", "json"])
    args = d.args
    d.args = lambda: ["unshare", "--mount", "--propagation", "private", "sh", "-c",  # type: ignore[method-assign]
                      f'mount --bind {pages} /sys/kernel/mm/hugepages && exec "$@"', "sh",
                      *args()]
    d.start()
    try:
        def probes() -> list[dict[str, object]]:
            return [e for e in map(json.loads, d.log_path.read_text().splitlines())
                    if e.get("event") == "daemon.cgroups"]

        assert [p["hugepage_sizes"] for p in probes()] == [["2MB"]]
        (pages / "hugepages-1048576kB").mkdir()
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "daemon.reloaded" not in d.log_path.read_text():
            assert time.monotonic() < deadline, "no reload event"
            time.sleep(0.05)
        assert [p["hugepage_sizes"] for p in probes()] == [["2MB"], ["2MB", "1GB"]]
        reloaded = [e for e in map(json.loads, d.log_path.read_text().splitlines())
                    if e.get("event") == "daemon.reloaded"]
        assert "cgroups" in reloaded[0]["changed"]
    finally:
        d.stop()
