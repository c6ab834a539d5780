"""The streaming server's pure parts: status documents, resize decoding, tokens, ports,
negotiation, the HTTP head reader, and TLS."""

from __future__ import annotations

import asyncio
import datetime
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from moorage.errors import ResourceExhausted
from moorage.streaming import ExecRequest, StreamingConfig, StreamingServer, TerminalSize
from moorage.streaming.http import BadRequest, negotiate, read_request, response
from moorage.streaming.portforward import parse_ports, websocket_ports
from moorage.streaming.remotecommand import (
    ResizeDecoder,
    resize_events,
    status_bytes,
    status_error,
    status_exit_code,
    status_success,
    version_of,
)
from moorage.streaming.tokens import TokenCache
from tests.interop.fakes import FakeBackend


def test_status_documents_match_metav1_status() -> None:
    assert status_success() == b'{"metadata":{},"status":"Success"}'
    assert json.loads(status_exit_code(137, ("sleep", "10"))) == {
        "metadata": {}, "status": "Failure",
        "message": "command terminated with non-zero exit code: error executing command "
                   "[sleep 10], exit code 137",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": "137"}]},
    }
    assert json.loads(status_error("boom")) == {
        "metadata": {}, "status": "Failure", "message": "Internal error occurred: boom",
        "reason": "InternalError", "details": {"causes": [{"message": "boom"}]}, "code": 500,
    }


def test_status_by_version() -> None:
    assert status_bytes(4, 0, None) == status_success()
    assert status_bytes(3, 0, None) == b""  # v1-v3 say nothing on success
    assert status_bytes(2, 5, None) == b"command terminated with non-zero exit code: exit code 5"
    assert status_bytes(1, None, "bad") == b"bad"
    assert json.loads(status_bytes(5, None, "bad"))["reason"] == "InternalError"


def test_versions() -> None:
    assert [version_of(p) for p in ("channel.k8s.io", "base64.channel.k8s.io",
                                    "v2.channel.k8s.io", "v4.base64.channel.k8s.io",
                                    "v5.channel.k8s.io")] == [1, 1, 2, 4, 5]


def test_resize_decoder_takes_a_stream_of_objects() -> None:
    d = ResizeDecoder()
    assert d.feed(b'{"Width":80,"Height":24}{"Width":1') == [TerminalSize(80, 24)]
    assert d.feed(b'00,"Height":30}\n {"Width":-1,"Height":2}{"x":1}') == [
        TerminalSize(100, 30)]
    with pytest.raises(ValueError):
        d.feed(b"{" + b"x" * 5000)


async def test_resize_events_stop_at_garbage() -> None:
    class R:
        def __init__(self, chunks: list[bytes]) -> None:
            self.chunks = chunks

        async def read(self) -> bytes:
            return self.chunks.pop(0) if self.chunks else b""

    sizes = [s async for s in resize_events(R([b'{"Width":1,"Height":2}', b"[" * 5000]))]
    assert sizes == [TerminalSize(1, 2)]


def test_tokens_single_use_expiry_capacity() -> None:
    now = [0.0]
    cache: TokenCache[str] = TokenCache(ttl=60, capacity=2, clock=lambda: now[0])
    a = cache.insert("a")
    b = cache.insert("b")
    assert len(a) >= 20 and a != b
    with pytest.raises(ResourceExhausted):
        cache.insert("c")
    assert cache.consume(a) == "a" and cache.consume(a) is None
    now[0] = 61
    assert cache.consume(b) is None  # expired
    assert len(cache) == 0
    cache.insert("d")
    cache.insert("e")  # expired ones no longer count against the capacity
    assert cache.consume("made-up") is None


def test_ports_and_negotiation() -> None:
    assert parse_ports(["80", "443,8080"]) == [80, 443, 8080]
    assert parse_ports([]) == []
    for bad in ([""], ["0"], ["65536"], ["http"]):
        with pytest.raises(ValueError):
            parse_ports(bad)
    # The PortForward request's ports; a query narrows them, or names them where the
    # request named none.
    assert websocket_ports((80, 81), []) == [80, 81]
    assert websocket_ports((80, 81), ["81"]) == [81]
    assert websocket_ports((), ["8080,9090"]) == [8080, 9090]
    with pytest.raises(ValueError, match="port 22 was not in the PortForward request"):
        websocket_ports((80,), ["80,22"])
    with pytest.raises(ValueError, match="no ports to forward"):
        websocket_ports((), [])
    assert negotiate(["a", "b"], ["b", "a"]) == "a"
    assert negotiate(["x"], ["a"]) is None


async def test_read_request() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"POST /exec/tok?x=1&port=80 HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\n"
                     b"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: a, b\r\n"
                     b"X-Stream-Protocol-Version: c\r\nContent-Length: 0\r\n\r\nFRAMES")
    req = await read_request(reader)
    assert req is not None
    assert (req.method, req.path, req.query["port"]) == ("POST", "/exec/tok", ["80"])
    assert req.is_spdy and not req.is_websocket
    assert req.tokens("x-stream-protocol-version") == ["a", "b", "c"]
    assert req.leftover == b"FRAMES"
    empty = asyncio.StreamReader()
    empty.feed_eof()
    assert await read_request(empty) is None
    big = asyncio.StreamReader()
    big.feed_data(b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
    with pytest.raises(BadRequest):
        await read_request(big)


def test_response_bytes() -> None:
    assert response(404, body="nope") == (
        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 4\r\nConnection: close\r\n\r\nnope")
    assert response(101, [("Upgrade", "SPDY/3.1")]) == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: SPDY/3.1\r\n\r\n")


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    crypto = pytest.importorskip("cryptography")
    del crypto
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
async def tls_server(tls_files: tuple[Path, Path]) -> AsyncIterator[StreamingServer]:
    cert, key = tls_files
    s = StreamingServer(FakeBackend(), StreamingConfig(tls_cert=cert, tls_key=key))
    await s.start()
    yield s
    await s.stop()


async def test_tls(tls_server: StreamingServer, tls_files: tuple[Path, Path]) -> None:
    url = tls_server.get_exec(ExecRequest("c", ("echo", "x"), stdout=True))
    assert url.startswith(f"https://127.0.0.1:{tls_server.port}/exec/")
    ctx = ssl.create_default_context(cafile=str(tls_files[0]))
    ctx.check_hostname = False
    r, w = await asyncio.open_connection("127.0.0.1", tls_server.port, ssl=ctx)
    w.write(b"GET /exec/unknown HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(r.read(), 10)).startswith(b"HTTP/1.1 404")
    w.close()


async def test_tls_needs_both_files(tls_files: tuple[Path, Path]) -> None:
    s = StreamingServer(FakeBackend(), StreamingConfig(tls_cert=tls_files[0]))
    with pytest.raises(ValueError):
        await s.start()
