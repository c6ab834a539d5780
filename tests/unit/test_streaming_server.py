"""The streaming server in-process, with a fake backend: HTTP, tokens, negotiation, the SPDY
and WebSocket sessions, and independent clients (Go spdystream, websockets, kubernetes)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect

from moorage.errors import InvalidArgument, ResourceExhausted
from moorage.streaming import (
    AttachRequest,
    ExecRequest,
    PortForwardRequest,
    StreamingConfig,
    StreamingServer,
)
from moorage.streaming.spdy import frames
from tests.fixtures.queryproxy import query_dropping_proxy
from tests.interop.build import build, missing
from tests.interop.fakes import FakeBackend, RawSpdyClient, echo_server

V4 = "v4.channel.k8s.io"
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def backend() -> AsyncIterator[FakeBackend]:
    server = await echo_server()
    yield FakeBackend(echo_port=server.sockets[0].getsockname()[1])
    server.close()


@pytest.fixture
async def server(backend: FakeBackend) -> AsyncIterator[StreamingServer]:
    s = StreamingServer(backend, StreamingConfig(stream_creation_timeout=2.0))
    await s.start()
    yield s
    await s.stop()


def exec_url(s: StreamingServer, *cmd: str, **kw: bool) -> str:
    opts = {"stdout": True, **kw}
    return s.get_exec(ExecRequest("c1", tuple(cmd), **opts))


# -- the RPC half ------------------------------------------------------------------------


async def test_urls_and_validation(server: StreamingServer) -> None:
    url = exec_url(server, "echo")
    assert url.startswith(f"http://127.0.0.1:{server.port}/exec/")
    assert server.get_attach(AttachRequest("c1", stdout=True)).split("/")[3] == "attach"
    assert "/portforward/" in server.get_port_forward(PortForwardRequest("pod", (80,)))
    for bad in (ExecRequest("c1", ("sh",)), ExecRequest("c1", ("sh",), tty=True, stderr=True),
                ExecRequest("c1", (), stdout=True), ExecRequest("", ("sh",), stdout=True)):
        with pytest.raises(InvalidArgument):
            server.get_exec(bad)
    with pytest.raises(InvalidArgument, match="tty and stderr"):
        server.get_attach(AttachRequest("c1", tty=True, stdout=True, stderr=True))
    with pytest.raises(InvalidArgument):
        server.get_port_forward(PortForwardRequest("pod", (0,)))


async def test_tokens_in_flight_are_bounded(backend: FakeBackend) -> None:
    s = StreamingServer(backend, StreamingConfig(max_in_flight=3))
    for _ in range(3):
        exec_url(s, "echo")
    with pytest.raises(ResourceExhausted):
        exec_url(s, "echo")


async def test_ipv6_and_unspecified_addresses(backend: FakeBackend) -> None:
    s = StreamingServer(backend, StreamingConfig(address="0.0.0.0"))
    s.port = 1234
    assert s.base_url == "http://127.0.0.1:1234"
    s = StreamingServer(backend, StreamingConfig(address="::1"))
    s.port = 1234
    assert s.base_url == "http://[::1]:1234"


# -- HTTP and negotiation ----------------------------------------------------------------


async def raw_http(server: StreamingServer, request: str) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", server.port)
    w.write(request.encode())
    data = await asyncio.wait_for(r.read(), 10)
    w.close()
    return data


async def test_tokens_are_single_use(server: StreamingServer) -> None:
    url = exec_url(server, "echo", "once")
    c = await RawSpdyClient.connect(url, [V4])
    assert c.status == 101
    c.close()
    again = await RawSpdyClient.connect(url, [V4])
    assert again.status == 404
    again.close()


async def test_expired_token(backend: FakeBackend) -> None:
    s = StreamingServer(backend, StreamingConfig(token_ttl=0.05))
    await s.start()
    try:
        url = exec_url(s, "echo")
        await asyncio.sleep(0.1)
        c = await RawSpdyClient.connect(url, [V4])
        assert c.status == 404
    finally:
        await s.stop()


async def test_token_of_another_kind_and_unknown_paths(server: StreamingServer) -> None:
    token = exec_url(server, "echo").rsplit("/", 1)[1]
    out = await raw_http(server, f"GET /attach/{token} HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 404")
    out = await raw_http(server, "GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 404")
    token = exec_url(server, "echo").rsplit("/", 1)[1]
    out = await raw_http(server, f"DELETE /exec/{token} HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 405")
    out = await raw_http(server, "garbage\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400")


async def test_spdy_negotiation_errors(server: StreamingServer) -> None:
    c = await RawSpdyClient.connect(exec_url(server, "echo"), ["v9.channel.k8s.io"])
    assert c.status == 403
    assert c.header("X-Accepted-Stream-Protocol-Versions") == [
        "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"]
    c = await RawSpdyClient.connect(exec_url(server, "echo"), [])
    assert c.status == 400
    c = await RawSpdyClient.connect(server.get_port_forward(PortForwardRequest("pod")), [V4])
    assert c.status == 403
    assert c.header("X-Accepted-Stream-Protocol-Versions") == ["portforward.k8s.io"]
    out = await raw_http(server, f"GET {exec_url(server, 'echo')[22:]} HTTP/1.1\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 4")
    # A comma-separated offer counts too, in the client's order.
    c = await RawSpdyClient.connect(exec_url(server, "echo"), ["v9.x, v3.channel.k8s.io, " + V4])
    assert c.status == 101 and c.header("X-Stream-Protocol-Version") == ["v3.channel.k8s.io"]
    c.close()


# -- SPDY sessions, frame by frame ---------------------------------------------------------


async def test_spdy_session_frames(server: StreamingServer) -> None:
    c = await RawSpdyClient.connect(exec_url(server, "cat", stdin=True), [V4])
    assert c.status == 101
    assert c.header("Upgrade") == ["SPDY/3.1"]
    c.syn(1, {"streamtype": "error"})
    c.syn(3, {"streamtype": "stdin"})
    c.syn(5, {"streamtype": "stdout"})
    c.send(frames.ping(9))
    replies = []
    for _ in range(4):
        f = await c.frame()
        replies.append(f)
    kinds = [type(f).__name__ for f in replies]
    assert kinds.count("SynReply") == 3 and frames.Ping(9) in replies
    for f in replies:
        if isinstance(f, frames.SynReply):
            assert c.headers_of(f.header_block) == {}
    c.send(frames.data(3, b"hello "))
    c.send(frames.data(3, b"world", fin=True))
    rest = await c.until_eof()
    out = b"".join(f.data for f in rest if isinstance(f, frames.Data) and f.stream_id == 5)
    assert out == b"hello world"
    status = b"".join(f.data for f in rest if isinstance(f, frames.Data) and f.stream_id == 1)
    assert json.loads(status) == {"metadata": {}, "status": "Success"}
    fins = {f.stream_id for f in rest if isinstance(f, frames.Data) and f.fin}
    assert fins == {1, 3, 5}  # every stream closed by the server, stdin too
    assert isinstance(rest[-1], frames.GoAway) and rest[-1].last_good_stream_id == 5


async def test_spdy_bad_streams(server: StreamingServer) -> None:
    c = await RawSpdyClient.connect(exec_url(server, "echo", "x"), [V4])
    c.syn(2, {"streamtype": "error"})  # even: a server id
    f = await c.frame()
    assert f == frames.RstStream(2, frames.RstStatus.PROTOCOL_ERROR)
    c.syn(3, {"streamtype": "bogus"})
    f = await c.frame()
    assert f == frames.RstStream(3, frames.RstStatus.REFUSED_STREAM)
    rest = await c.until_eof()
    assert isinstance(rest[-1], frames.GoAway)


async def test_spdy_streams_must_come_in_time(server: StreamingServer,
                                              backend: FakeBackend) -> None:
    c = await RawSpdyClient.connect(exec_url(server, "echo", "x"), [V4])
    c.syn(1, {"streamtype": "error"})  # stdout never comes
    rest = await c.until_eof(timeout=10)
    assert isinstance(rest[0], frames.SynReply) and isinstance(rest[-1], frames.GoAway)


async def test_client_that_goes_away_cancels_the_command(server: StreamingServer,
                                                         backend: FakeBackend) -> None:
    c = await RawSpdyClient.connect(exec_url(server, "sleep"), [V4])
    c.syn(1, {"streamtype": "error"})
    c.syn(3, {"streamtype": "stdout"})
    await c.frame()
    await c.frame()
    await asyncio.sleep(0.1)
    c.writer.transport.abort()
    for _ in range(100):
        if backend.cancelled:
            break
        await asyncio.sleep(0.05)
    assert backend.cancelled == ["sleep"]


async def test_a_client_that_does_not_read_blocks_only_itself(
        server: StreamingServer, backend: FakeBackend) -> None:
    stuck = await RawSpdyClient.connect(exec_url(server, "forever", "a"), [V4])
    stuck.syn(1, {"streamtype": "error"})
    stuck.syn(3, {"streamtype": "stdout"})
    await asyncio.sleep(0.5)  # ... and never reads again
    # Another session runs to its end meanwhile.
    other = await RawSpdyClient.connect(exec_url(server, "echo", "free"), [V4])
    other.syn(1, {"streamtype": "error"})
    other.syn(3, {"streamtype": "stdout"})
    rest = await other.until_eof()
    assert b"free\n" in b"".join(f.data for f in rest if isinstance(f, frames.Data))
    # The stuck one is held back by its own socket: what was produced is bounded.
    first = backend.written["a"]
    await asyncio.sleep(0.3)
    assert backend.written["a"] == first < 16 * 1024 * 1024
    stuck.writer.transport.abort()
    for _ in range(100):
        if backend.cancelled:
            break
        await asyncio.sleep(0.05)
    assert backend.cancelled == ["forever"]


# -- the Go client (spdystream, as client-go) ---------------------------------------------


@pytest.fixture(scope="module")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    why = missing()
    if why:
        pytest.skip(why)
    return build("spdyclient", tmp_path_factory.mktemp("go"))


async def go(client: Path, url: str, *args: str, stdin: bytes = b"",
             tmp: Path) -> tuple[dict[str, Any], bytes]:
    result = tmp / f"result-{os.urandom(4).hex()}.json"
    proc = await asyncio.create_subprocess_exec(
        client, "-url", url, "-result", str(result), *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(stdin), 120)
    return json.loads(result.read_text()), out


async def test_go_exec(server: StreamingServer, go_client: Path, tmp_path: Path) -> None:
    res, out = await go(go_client, exec_url(server, "echo", "hi"), tmp=tmp_path)
    assert res["protocol"] == V4 and out == b"hi\n"
    assert res["status"] == {"metadata": {}, "status": "Success"}
    res, out = await go(go_client, exec_url(server, "cat", stdin=True), "-stdin",
                        stdin=b"line\n" * 1000, tmp=tmp_path)
    assert out == b"line\n" * 1000
    res, _ = await go(go_client, exec_url(server, "exit", "42"), tmp=tmp_path)
    status = res["status"]
    assert status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "42"}]
    res, _ = await go(go_client, exec_url(server, "fail"), tmp=tmp_path)
    assert res["status"]["reason"] == "InternalError"
    res, _ = await go(go_client, exec_url(server, "err", "oops", stdout=False, stderr=True),
                      "-stdout=false", "-stderr", tmp=tmp_path)
    assert res["stderr_len"] == 4


async def test_go_older_protocols(server: StreamingServer, go_client: Path,
                                  tmp_path: Path) -> None:
    for proto in ("v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"):
        res, out = await go(go_client, exec_url(server, "echo", "old"), "-protocols", proto,
                            tmp=tmp_path)
        assert res["protocol"] == proto and out == b"old\n" and res.get("error_text", "") == ""
        res, _ = await go(go_client, exec_url(server, "exit", "3"), "-protocols", proto,
                          tmp=tmp_path)
        assert "exit code 3" in res["error_text"]


async def test_go_100_mib(server: StreamingServer, go_client: Path, tmp_path: Path) -> None:
    res, _ = await go(go_client, exec_url(server, "big", "100"), "-count", tmp=tmp_path)
    assert res["stdout_len"] == 100 * 1024 * 1024


async def test_go_resize(server: StreamingServer, backend: FakeBackend, go_client: Path,
                         tmp_path: Path) -> None:
    url = exec_url(server, "sizes", "2", tty=True, stdin=True)
    result = tmp_path / "r.json"
    proc = await asyncio.create_subprocess_exec(
        go_client, "-url", url, "-result", str(result), "-tty", "-stdin",
        "-sizes", "80x24,132x50", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"80x24\n"
    proc.send_signal(signal.SIGUSR1)
    assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"132x50\n"
    assert proc.stdin is not None
    proc.stdin.close()
    await asyncio.wait_for(proc.wait(), 10)
    assert [(s.width, s.height) for s in backend.sizes] == [(80, 24), (132, 50)]


async def test_go_reused_token(server: StreamingServer, go_client: Path,
                               tmp_path: Path) -> None:
    url = exec_url(server, "echo", "x")
    res, _ = await go(go_client, url, tmp=tmp_path)
    assert res["http_status"] == 101
    res, _ = await go(go_client, url, tmp=tmp_path)
    assert res["http_status"] == 404


async def test_go_attach(server: StreamingServer, backend: FakeBackend, go_client: Path,
                         tmp_path: Path) -> None:
    url = server.get_attach(AttachRequest("c1", stdout=True))
    res, out = await go(go_client, url, tmp=tmp_path)
    assert out == b"attached\n" and res["status"]["status"] == "Success"


async def test_go_port_forward(server: StreamingServer, go_client: Path,
                               tmp_path: Path) -> None:
    url = server.get_port_forward(PortForwardRequest("pod", (80,)))
    res, _ = await go(go_client, url, "-mode", "portforward", "-port", "80", "-conns", "20",
                      "-request", "ping", tmp=tmp_path)
    assert res["protocol"] == "portforward.k8s.io"
    assert [(c["head"], c["error"]) for c in res["conns"]] == [("echo:ping", "")] * 20
    url = server.get_port_forward(PortForwardRequest("pod"))
    res, _ = await go(go_client, url, "-mode", "portforward", "-port", "81", tmp=tmp_path)
    assert res["conns"][0]["len"] == 0
    assert "error forwarding port 81 to pod pod" in res["conns"][0]["error"]
    assert "connection refused" in res["conns"][0]["error"]


# -- WebSocket --------------------------------------------------------------------------------


def ws_url(url: str) -> str:
    return "ws" + url[len("http"):]


async def ws_session(url: str, protocols: list[str], send: list[bytes | str]
                     ) -> tuple[str | None, list[bytes | str]]:
    async with ws_connect(ws_url(url), subprotocols=protocols or None,  # type: ignore[arg-type]
                          max_size=None) as ws:
        for m in send:
            await ws.send(m)
        got = [m async for m in ws]
        return ws.subprotocol, got


def channels(messages: list[bytes | str]) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for m in messages:
        if isinstance(m, str):
            ch, data = int(m[0]), base64.b64decode(m[1:])
        else:
            ch, data = m[0], m[1:]
        out[ch] = out.get(ch, b"") + data
    return out


async def test_ws_v5_stdin_and_close_signal(server: StreamingServer) -> None:
    url = exec_url(server, "cat", stdin=True)
    proto, got = await ws_session(url, ["v5.channel.k8s.io"],
                                  [b"\x00abc", b"\x00def", b"\xff\x00"])
    assert proto == "v5.channel.k8s.io"
    assert got[0] == b"\x01"  # ready: an empty message on stdout
    ch = channels(got)
    assert ch[1] == b"abcdef"
    assert json.loads(ch[3]) == {"metadata": {}, "status": "Success"}
    assert b"\xff\x01" in got  # stdout closed before the status


async def test_ws_v4_exit_code_and_base64(server: StreamingServer) -> None:
    proto, got = await ws_session(exec_url(server, "exit", "7"), [V4], [])
    assert proto == V4
    assert json.loads(channels(got)[3])["details"]["causes"][0]["message"] == "7"
    proto, got = await ws_session(exec_url(server, "echo", "b64"),
                                  ["v4.base64.channel.k8s.io"], [])
    assert proto == "v4.base64.channel.k8s.io" and all(isinstance(m, str) for m in got)
    assert channels(got)[1] == b"b64\n"
    # No subprotocol: binary channel.k8s.io (v1), errors as text.
    proto, got = await ws_session(exec_url(server, "exit", "2"), [], [])
    assert proto is None and b"exit code 2" in channels(got)[3]


async def test_ws_unsupported_subprotocol(server: StreamingServer) -> None:
    with pytest.raises(websockets.exceptions.InvalidStatus) as e:
        await ws_session(exec_url(server, "echo"), ["v9.channel.k8s.io"], [])
    assert e.value.response.status_code == 400


async def test_ws_port_forward(server: StreamingServer) -> None:
    url = server.get_port_forward(PortForwardRequest("pod")) + "?port=80"
    async with ws_connect(ws_url(url), subprotocols=["v4.channel.k8s.io"]) as ws:  # type: ignore[list-item]
        assert await ws.recv() == b"\x00" + struct.pack("<H", 80)
        assert await ws.recv() == b"\x01" + struct.pack("<H", 80)
        await ws.send(b"\x00hello")
        # v4 cannot half-close a channel: the echo server answers at EOF, so close it here.
        await asyncio.sleep(0.2)
    url = server.get_port_forward(PortForwardRequest("pod")) + "?port=9"
    async with ws_connect(ws_url(url), subprotocols=["v4.channel.k8s.io"]) as ws:  # type: ignore[list-item]
        got = [m async for m in ws]
    assert b"connection refused" in channels(got)[1]
    with pytest.raises(websockets.exceptions.InvalidStatus):
        await ws_session(server.get_port_forward(PortForwardRequest("pod")), [V4], [])


async def ws_port_prefixes(url: str, prefixes: int = 0
                           ) -> tuple[dict[int, bytes], list[bytes | str]]:
    """A WebSocket port-forward as client-go's e2e client makes it (``v4.channel.k8s.io``):
    the port prefixes the server writes first on each channel, then what follows until
    the server closes (it does once every port's connection ended), or only the first
    ``prefixes`` messages (the echo server answers at an EOF v4 cannot send)."""
    async with ws_connect(ws_url(url), subprotocols=[V4]) as ws:  # type: ignore[list-item]
        got = [await ws.recv() for _ in range(prefixes)] if prefixes else [m async for m in ws]
    firsts: dict[int, bytes] = {}
    for m in got:
        assert isinstance(m, bytes)
        firsts.setdefault(m[0], m[1:])
    return firsts, got


async def test_ws_port_forward_takes_the_ports_of_the_request(server: StreamingServer,
                                                               tmp_path: Path) -> None:
    """kubelet proxies the upgrade to the URL without the client's ``?port=``: the ports
    are the PortForward request's (port 81: refused, reported on its error channel)."""
    url = server.get_port_forward(PortForwardRequest("pod", (81,)))
    host = url.split("/")[2]
    with query_dropping_proxy(host) as proxied:
        firsts, got = await ws_port_prefixes(url.replace(host, proxied) + "?port=81")
    assert firsts == {0: struct.pack("<H", 81), 1: struct.pack("<H", 81)}
    assert b"connection refused" in channels(got)[1]
    # A query may narrow the granted ports (a direct client), never widen them.
    url = server.get_port_forward(PortForwardRequest("pod", (80, 81)))
    firsts, _ = await ws_port_prefixes(url + "?port=81")
    assert firsts == {0: struct.pack("<H", 81), 1: struct.pack("<H", 81)}
    url = server.get_port_forward(PortForwardRequest("pod", (80, 81)))
    firsts, _ = await ws_port_prefixes(url, prefixes=4)
    assert firsts == {0: struct.pack("<H", 80), 1: struct.pack("<H", 80),
                      2: struct.pack("<H", 81), 3: struct.pack("<H", 81)}
    with pytest.raises(websockets.exceptions.InvalidStatus) as e:
        await ws_port_prefixes(server.get_port_forward(PortForwardRequest("pod", (80,)))
                               + "?port=22")
    assert e.value.response.status_code == 400
    assert b"port 22 was not in the PortForward request" in e.value.response.body


async def test_go_port_forward_tunnelled_in_a_websocket(server: StreamingServer,
                                                        go_client: Path,
                                                        tmp_path: Path) -> None:
    """KEP-4006: crictl's and critest's WebSocket port-forward (client-go's
    NewSPDYOverWebsocketDialer): SPDY inside binary messages, ports in stream headers,
    also through a proxy that drops the query."""
    url = server.get_port_forward(PortForwardRequest("pod"))
    res, _ = await go(go_client, url, "-mode", "portforward", "-tunnel", "-port", "80",
                      "-conns", "20", "-request", "ping", tmp=tmp_path)
    assert (res["http_status"], res["protocol"]) == (101, "portforward.k8s.io"), res
    assert [(c["head"], c["error"]) for c in res["conns"]] == [("echo:ping", "")] * 20
    url = server.get_port_forward(PortForwardRequest("pod", (80,)))
    host = url.split("/")[2]
    with query_dropping_proxy(host) as proxied:
        res, _ = await go(go_client, url.replace(host, proxied) + "?port=80", "-mode",
                          "portforward", "-tunnel", "-port", "81", tmp=tmp_path)
    assert res["http_status"] == 101
    assert "error forwarding port 81 to pod pod" in res["conns"][0]["error"]


async def test_kubernetes_client(server: StreamingServer) -> None:
    ws_client = pytest.importorskip("kubernetes.stream.ws_client")
    from kubernetes.client import Configuration

    def run(url: str) -> tuple[str, int | None]:
        client = ws_client.WSClient(Configuration(), ws_url(url), headers=None,
                                    capture_all=True, binary=True)
        client.write_stdin(b"from kubernetes\n")
        client.close_channel(0)
        client.run_forever(timeout=10)
        return client.read_stdout(), client.returncode

    out, code = await asyncio.to_thread(run, exec_url(server, "cat", stdin=True))
    assert out == b"from kubernetes\n" and code == 0
