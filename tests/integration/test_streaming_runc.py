"""The streaming server against a real runc container (root), in-process, with a backend
that execs through ``OciRuntime`` (``moorage.streaming.process``) and dials through
``moorage.streaming.dial`` into a network namespace made here. Clients: the Go spdystream
client (``tests/interop/spdyclient``), the ``websockets`` client and the ``kubernetes``
client. The daemon-wired version of these is ``tests/e2e/test_streaming.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect as ws_connect

from moorage.oci.runtime import OciRuntime
from moorage.streaming import (
    AttachRequest,
    BackendError,
    ExecRequest,
    PortForwardRequest,
    Stdio,
    StreamingServer,
)
from moorage.streaming.dial import dial
from moorage.streaming.process import run_exec
from tests.integration.test_oci_runc import _remove_cgroup_tree
from tests.interop.build import build, missing

RUNC = shutil.which("runc") or "/usr/sbin/runc"
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "cat", "stty", "dd", "sleep", "echo", "httpd", "true", "kill", "wc", "ls",
           "read", "ps")
INIT = ["sh", "-c", "httpd -p 8080 -h /www; trap 'exit 0' TERM; sleep 100000 & wait"]

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(180),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not os.path.exists(RUNC), reason="needs runc"),
    pytest.mark.skipif(not BUSYBOX.exists(), reason="needs busybox-static"),
]


@dataclass
class RuncBackend:
    runtime: OciRuntime
    netns: str
    kill: asyncio.Event = field(default_factory=asyncio.Event)

    async def exec(self, req: ExecRequest, stdio: Stdio) -> int:
        return await run_exec(self.runtime, req.container_id, req.cmd, stdio, kill=self.kill)

    async def attach(self, req: AttachRequest, stdio: Stdio) -> None:
        raise BackendError("no monitor in this test")

    async def dial(self, sandbox_id: str, port: int) -> socket.socket:
        return await dial(self.netns, port)


@dataclass
class Env:
    runtime: OciRuntime
    cid: str
    netns: str
    server: StreamingServer
    backend: RuncBackend
    client: Path
    tmp: Path

    def exec_url(self, *cmd: str, **kw: bool) -> str:
        return self.server.get_exec(ExecRequest(self.cid, tuple(cmd), **{"stdout": True, **kw}))

    async def go(self, url: str, *args: str, stdin: bytes = b"") -> tuple[dict[str, Any], bytes]:
        result = self.tmp / f"result-{secrets.token_hex(4)}.json"
        proc = await asyncio.create_subprocess_exec(
            self.client, "-url", url, "-result", str(result), *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(stdin), 150)
        return json.loads(result.read_text()), out

    async def ps(self) -> list[int]:
        return await self.runtime.ps(self.cid)


@pytest.fixture(scope="module")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    why = missing()
    if why:
        pytest.skip(why)
    return build("spdyclient", tmp_path_factory.mktemp("go"))


def _wait_for_listener(netns: str, port: int, deadline: float = 20.0) -> None:
    """``runc start`` returns once the init process is exec'd, not once httpd listens:
    wait (bounded) until the pod's loopback takes a connection on ``port``."""
    async def probe() -> None:
        async with asyncio.timeout(deadline):
            while True:
                try:
                    sock = await dial(netns, port, timeout=1.0)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                sock.close()
                return

    asyncio.run(probe())


@pytest.fixture
def container(tmp_path: Path) -> Iterator[tuple[OciRuntime, str, str]]:
    """A running busybox container (httpd on 8080) in a network namespace made here."""
    name = f"mstream-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    netns = f"/run/netns/{name}"
    top = f"moorage-test-{secrets.token_hex(4)}"
    runtime = OciRuntime("runc", RUNC, tmp_path / "runc-root")
    cid = "stream"
    try:
        subprocess.run(["nsenter", f"--net={netns}", "ip", "link", "set", "lo", "up"],
                       check=True)
        bundle = tmp_path / "bundle"
        rootfs = bundle / "rootfs"
        for d in ("bin", "proc", "sys", "dev", "tmp", "etc", "www"):
            (rootfs / d).mkdir(parents=True)
        shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
        for applet in APPLETS:
            (rootfs / "bin" / applet).symlink_to("busybox")
        (rootfs / "www" / "index.html").write_bytes(b"<h1>moorage</h1>\n" * 1000)
        subprocess.run([RUNC, "spec"], cwd=bundle, check=True)
        config = json.loads((bundle / "config.json").read_text())
        config["process"].update(terminal=False, args=INIT, env=["PATH=/bin", "TERM=xterm"])
        config["root"]["readonly"] = False
        config["linux"]["cgroupsPath"] = f"/{top}/{cid}"
        config["linux"]["namespaces"] = [
            ns if ns["type"] != "network" else {"type": "network", "path": netns}
            for ns in config["linux"]["namespaces"]]
        (bundle / "config.json").write_text(json.dumps(config))
        for command in ("create", "start"):
            args = ["create", "--bundle", str(bundle), cid] if command == "create" else [
                "start", cid]
            subprocess.run([RUNC, *runtime.global_args, *args], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                           timeout=60)
        _wait_for_listener(netns, 8080)
        yield runtime, cid, netns
    finally:
        subprocess.run([RUNC, *runtime.global_args, "delete", "--force", cid],
                       capture_output=True, check=False, timeout=60)
        _remove_cgroup_tree(top)
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
async def env(container: tuple[OciRuntime, str, str], go_client: Path,
              tmp_path: Path) -> AsyncIterator[Env]:
    runtime, cid, netns = container
    backend = RuncBackend(runtime, netns)
    server = StreamingServer(backend)
    await server.start()
    try:
        yield Env(runtime, cid, netns, server, backend, go_client, tmp_path)
    finally:
        await server.stop()


def status(res: dict[str, Any]) -> dict[str, Any]:
    s = res["status"]
    assert isinstance(s, dict), res
    return s


def exit_code(res: dict[str, Any]) -> int:
    s = status(res)
    if s["status"] == "Success":
        return 0
    assert s["reason"] == "NonZeroExitCode", s
    return int(s["details"]["causes"][0]["message"])


# -- exec over SPDY (the Go client) --------------------------------------------------------


async def test_tty_exec_with_resize(env: Env) -> None:
    url = env.exec_url("sh", tty=True, stdin=True)
    result = env.tmp / "tty.json"
    proc = await asyncio.create_subprocess_exec(
        env.client, "-url", url, "-result", str(result), "-tty", "-stdin",
        "-sizes", "111x33,132x50", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    seen = b""

    async def size_becomes(text: bytes) -> None:
        # The client sends sizes on their own stream, concurrently with stdin (kubectl
        # does the same), so a `stty size` typed at once may run before the size is
        # applied: ask again until the terminal reports it.
        nonlocal seen
        async with asyncio.timeout(20):
            while text not in seen:
                proc.stdin.write(b"stty size\n")  # type: ignore[union-attr]
                try:
                    async with asyncio.timeout(0.5):
                        while text not in seen:
                            chunk = await proc.stdout.read(4096)  # type: ignore[union-attr]
                            assert chunk, seen
                            seen += chunk
                except TimeoutError:
                    continue
        seen = seen[seen.index(text) + len(text):]

    await size_becomes(b"33 111")
    proc.send_signal(signal.SIGUSR1)
    await size_becomes(b"50 132")
    proc.stdin.write(b"exit 5\n")
    await asyncio.wait_for(proc.wait(), 20)
    res = json.loads(result.read_text())
    assert exit_code(res) == 5


async def test_stdin_piped_and_closed(env: Env) -> None:
    data = os.urandom(1 << 20)
    res, out = await env.go(env.exec_url("cat", stdin=True), "-stdin", stdin=data)
    assert out == data and exit_code(res) == 0


async def test_100_mib_of_output(env: Env) -> None:
    res, _ = await env.go(env.exec_url("dd", "if=/dev/zero", "bs=1M", "count=100"), "-count")
    assert res["stdout_len"] == 100 * 1024 * 1024 and exit_code(res) == 0


async def test_exit_codes_and_stderr(env: Env) -> None:
    res, _ = await env.go(env.exec_url("sh", "-c", "exit 3"))
    assert exit_code(res) == 3
    assert "exit code 3" in status(res)["message"]
    res, _ = await env.go(env.exec_url("sh", "-c", "kill -9 $$"))
    assert exit_code(res) == 137
    res, _ = await env.go(env.exec_url("sh", "-c", "echo out; echo err >&2", stderr=True),
                          "-stderr")
    assert (res["stdout_len"], res["stderr_len"]) == (4, 4)


async def test_a_command_that_cannot_start(env: Env) -> None:
    res, _ = await env.go(env.exec_url("/no/such/program"))
    s = status(res)
    assert s["reason"] == "InternalError" and "/no/such/program" in s["message"]


async def test_client_disconnect_kills_the_command(env: Env) -> None:
    before = await env.ps()
    url = env.exec_url("sh", "-c", "echo started; exec sleep 1000")
    proc = await asyncio.create_subprocess_exec(
        env.client, "-url", url, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 20) == b"started\n"
    assert len(await env.ps()) == len(before) + 1
    proc.kill()
    await proc.wait()
    for _ in range(200):
        if sorted(await env.ps()) == sorted(before):
            break
        await asyncio.sleep(0.05)
    assert sorted(await env.ps()) == sorted(before)


async def test_kill_switch_reports_137(env: Env) -> None:
    url = env.exec_url("sleep", "1000")
    task = asyncio.ensure_future(env.go(url))
    for _ in range(200):
        if len(await env.ps()) > 3:
            break
        await asyncio.sleep(0.05)
    env.backend.kill.set()  # what the container's "stopped" event does in the daemon
    res, _ = await task
    assert exit_code(res) == 137


# -- WebSocket ------------------------------------------------------------------------------


def ws(url: str) -> str:
    return "ws" + url[len("http"):]


async def test_websocket_v5_exec(env: Env) -> None:
    url = env.exec_url("sh", "-c", "read x; echo got $x; exit 4", stdin=True)
    async with ws_connect(ws(url), subprotocols=["v5.channel.k8s.io"]) as conn:  # type: ignore[list-item]
        await conn.send(b"\x00hello\n")
        await conn.send(b"\xff\x00")
        got = [m async for m in conn]
    out = b"".join(m[1:] for m in got if isinstance(m, bytes) and m[0] == 1)
    err = b"".join(m[1:] for m in got if isinstance(m, bytes) and m[0] == 3)
    assert out == b"got hello\n"
    assert json.loads(err)["details"]["causes"] == [{"reason": "ExitCode", "message": "4"}]


async def test_kubernetes_client_exec(env: Env) -> None:
    ws_client = pytest.importorskip("kubernetes.stream.ws_client")
    from kubernetes.client import Configuration

    def run(url: str) -> tuple[str, int | None]:
        client = ws_client.WSClient(Configuration(), ws(url), headers=None,
                                    capture_all=True, binary=True)
        client.write_stdin(b"one\ntwo\n")
        client.close_channel(0)
        client.run_forever(timeout=20)
        return client.read_stdout(), client.returncode

    out, code = await asyncio.to_thread(run, env.exec_url("wc", "-l", stdin=True))
    assert out.strip() == b"2" and code == 0


# -- port forward ---------------------------------------------------------------------------


async def test_port_forward_20_connections(env: Env) -> None:
    page = b"<h1>moorage</h1>\n" * 1000
    url = env.server.get_port_forward(PortForwardRequest("pod", (8080,)))
    res, _ = await env.go(url, "-mode", "portforward", "-port", "8080", "-conns", "20",
                          "-request", "GET /index.html HTTP/1.0\r\n\r\n")
    conns = res["conns"]
    assert len(conns) == 20
    assert {c["head"] for c in conns} == {"HTTP/1.1 200 OK"}  # busybox httpd
    assert {c["error"] for c in conns} == {""}
    assert all(c["len"] > len(page) for c in conns)
    assert len({c["sha256"] for c in conns}) == 1
    # A port nobody listens on: the error stream says so.
    url = env.server.get_port_forward(PortForwardRequest("pod"))
    res, _ = await env.go(url, "-mode", "portforward", "-port", "9999")
    assert "connection refused" in res["conns"][0]["error"].lower()


async def test_port_forward_over_websocket(env: Env) -> None:
    url = env.server.get_port_forward(PortForwardRequest("pod")) + "?port=8080"
    async with ws_connect(ws(url), subprotocols=["v4.channel.k8s.io"]) as conn:  # type: ignore[list-item]
        assert await conn.recv() == b"\x00" + struct.pack("<H", 8080)
        assert await conn.recv() == b"\x01" + struct.pack("<H", 8080)
        await conn.send(b"\x00GET /index.html HTTP/1.0\r\n\r\n")
        got = [m async for m in conn]
    body = b"".join(m[1:] for m in got if isinstance(m, bytes) and m[0] == 0)
    assert body.startswith(b"HTTP/1.1 200 OK") and body.endswith(b"<h1>moorage</h1>\n")


async def test_dial_is_in_the_namespace(env: Env) -> None:
    # The host's loopback has no 8080 listener from this test; the pod's has.
    sock = await dial(env.netns, 8080)
    with contextlib.closing(sock):
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"GET / HTTP/1.0\r\n\r\n")
        assert (await loop.sock_recv(sock, 100)).startswith(b"HTTP/1.1 200")
