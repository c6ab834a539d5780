"""Exec, Attach and PortForward end to end: the daemon's RPCs hand out URLs of its streaming
server, and independent clients use them: the Go spdystream client
(``tests/interop/spdyclient``, as client-go and kubectl) and the Python ``kubernetes``
client's WebSocket stream. The daemon runs in the test's node network namespace, so the
clients run there too (``nsenter --net``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from moorage.cri.v1 import api_pb2 as pb
from tests.e2e.test_containers import Env, busybox_ref, env  # noqa: F401 - fixtures
from tests.fixtures.queryproxy import query_dropping_proxy
from tests.interop.build import build, missing

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.timeout(300),
]
URL = re.compile(r"^http://127\.0\.0\.1:\d+/(exec|attach|portforward)/[A-Za-z0-9_-]+$")
PAGE = b"<h1>moorage</h1>\n" * 500


@pytest.fixture(scope="module")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    why = missing()
    if why:
        pytest.skip(why)
    return build("spdyclient", tmp_path_factory.mktemp("go"))


class Streams:
    def __init__(self, e: Env, client: Path) -> None:
        self.env = e
        self.client = client
        self.ns = e.d.netns
        assert self.ns

    def go_argv(self, url: str, result: Path, *args: str) -> list[str]:
        return ["nsenter", f"--net={self.ns}", str(self.client), "-url", url,
                "-result", str(result), *args]

    def go(self, url: str, *args: str, stdin: bytes = b"") -> tuple[dict[str, Any], bytes]:
        result = self.env.tmp / f"result-{secrets.token_hex(4)}.json"
        out = subprocess.run(self.go_argv(url, result, *args), input=stdin,
                             capture_output=True, timeout=240)
        assert result.exists(), out.stderr
        return json.loads(result.read_text()), out.stdout

    def exec_url(self, cid: str, *cmd: str, **kw: bool) -> str:
        opts = {"stdout": True, **kw}
        url = self.env.rt.Exec(pb.ExecRequest(container_id=cid, cmd=list(cmd), **opts)).url
        assert URL.match(url), url
        return str(url)


@pytest.fixture
def streams(env: Env, go_client: Path) -> Streams:  # noqa: F811 - env is the fixture
    return Streams(env, go_client)


def exit_code(res: dict[str, Any]) -> int:
    status = res["status"]
    assert isinstance(status, dict), res
    if status["status"] == "Success":
        return 0
    assert status["reason"] == "NonZeroExitCode", status
    return int(status["details"]["causes"][0]["message"])


def code_of(fn: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()  # type: ignore[no-any-return]


def wait_for(text: bytes, proc: subprocess.Popen[bytes], seen: bytearray,
             ask: bytes = b"") -> None:
    """Read the client's output until ``text`` shows, within 30 s (never blocking past it).

    ``ask`` is written again each second while waiting: a command typed before the
    terminal size reached the pty would report the old size.
    """
    assert proc.stdout is not None and proc.stdin is not None
    deadline = time.monotonic() + 30
    next_ask = 0.0
    while text not in seen:
        now = time.monotonic()
        assert now < deadline, bytes(seen)
        if ask and now >= next_ask:
            proc.stdin.write(ask)
            proc.stdin.flush()
            next_ask = now + 1.0
        ready, _, _ = select.select([proc.stdout.fileno()], [], [], 0.2)
        if not ready:
            continue
        chunk = os.read(proc.stdout.fileno(), 4096)
        assert chunk, bytes(seen)
        seen += chunk
    del seen[:seen.index(text) + len(text)]


# -- the RPCs -------------------------------------------------------------------------------


def test_rpc_validation(env: Env) -> None:  # noqa: F811
    pod = env.pod()
    created = env.create(pod, env.config("idle", ["sleep", "100000"]))
    rt = env.rt
    assert code_of(lambda: rt.Exec(pb.ExecRequest(container_id=created, cmd=["true"],
                                                  stdout=True))) \
        == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: rt.Exec(pb.ExecRequest(container_id="nope", cmd=["true"],
                                                  stdout=True))) == grpc.StatusCode.NOT_FOUND
    env.rt.StartContainer(pb.StartContainerRequest(container_id=created))
    for bad in (pb.ExecRequest(container_id=created, cmd=["true"]),
                pb.ExecRequest(container_id=created, cmd=["true"], tty=True, stdout=True,
                               stderr=True),
                pb.ExecRequest(container_id=created, stdout=True)):
        assert code_of(lambda b=bad: rt.Exec(b)) == grpc.StatusCode.INVALID_ARGUMENT
    assert URL.match(rt.Exec(pb.ExecRequest(container_id=created, cmd=["true"],
                                            stdout=True)).url)
    assert URL.match(rt.Attach(pb.AttachRequest(container_id=created, stdout=True)).url)
    assert URL.match(rt.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod, port=[80])).url)
    assert code_of(lambda: rt.Attach(pb.AttachRequest(container_id=created))) \
        == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: rt.PortForward(pb.PortForwardRequest(pod_sandbox_id="nope"))) \
        == grpc.StatusCode.NOT_FOUND
    rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod))
    assert code_of(lambda: rt.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod))) \
        == grpc.StatusCode.FAILED_PRECONDITION


# -- exec -----------------------------------------------------------------------------------


def test_exec_over_spdy(streams: Streams, env: Env) -> None:  # noqa: F811
    cid = env.run(env.pod(), "box", ["sleep", "100000"])
    data = os.urandom(1 << 20)
    res, out = streams.go(streams.exec_url(cid, "cat", stdin=True), "-stdin", stdin=data)
    assert out == data and exit_code(res) == 0
    res, _ = streams.go(streams.exec_url(cid, "sh", "-c", "exit 3"))
    assert exit_code(res) == 3
    res, _ = streams.go(streams.exec_url(cid, "/bin/busybox", "dd", "if=/dev/zero", "bs=1M",
                                         "count=100"), "-count")
    assert res["stdout_len"] == 100 * 1024 * 1024 and exit_code(res) == 0
    # A token is good once.
    url = streams.exec_url(cid, "true")
    assert streams.go(url)[0]["http_status"] == 101
    res, _ = streams.go(url)
    assert res["http_status"] == 404


def test_tty_exec_with_resize(streams: Streams, env: Env) -> None:  # noqa: F811
    cid = env.run(env.pod(), "box", ["sleep", "100000"])
    url = streams.exec_url(cid, "sh", tty=True, stdin=True)
    result = env.tmp / "tty.json"
    proc = subprocess.Popen(streams.go_argv(url, result, "-tty", "-stdin",
                                            "-sizes", "111x33,132x50"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None
    seen = bytearray()
    try:
        wait_for(b"33 111", proc, seen, ask=b"stty size\n")
        # SIGUSR1 to the Go client (nsenter execs it: same pid) sends the next size.
        proc.send_signal(signal.SIGUSR1)
        wait_for(b"50 132", proc, seen, ask=b"stty size\n")
        proc.stdin.write(b"exit 5\n")
        proc.stdin.flush()
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert exit_code(json.loads(result.read_text())) == 5


def test_exec_ends_with_its_client_and_its_container(streams: Streams,
                                                     env: Env) -> None:  # noqa: F811
    cid = env.run(env.pod(), "box", ["sleep", "100000"])

    def sleepers() -> int:
        out = env.exec(cid, ["ps", "-o", "args"]).stdout.decode()
        return sum(1 for line in out.splitlines() if "sleep 777" in line)

    result = env.tmp / "gone.json"
    proc = subprocess.Popen(streams.go_argv(streams.exec_url(cid, "sleep", "777"), result),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while sleepers() == 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc.kill()  # the client vanishes: its command is killed
    proc.wait()
    while sleepers():
        assert time.monotonic() < deadline + 20
        time.sleep(0.1)
    # An exec whose container stops ends too, with the kill's exit code.
    proc = subprocess.Popen(streams.go_argv(streams.exec_url(cid, "sleep", "777"), result),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while sleepers() == 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
    assert proc.wait(timeout=60) == 0
    assert exit_code(json.loads(result.read_text())) == 137


def test_exec_over_websocket_with_the_kubernetes_client(streams: Streams,
                                                        env: Env) -> None:  # noqa: F811
    pytest.importorskip("kubernetes.stream.ws_client")
    cid = env.run(env.pod(), "box", ["sleep", "100000"])
    url = streams.exec_url(cid, "sh", "-c", "read x; echo got $x; exit 4", stdin=True)
    script = (
        "import json, sys\n"
        "from kubernetes.client import Configuration\n"
        "from kubernetes.stream.ws_client import WSClient\n"
        "c = WSClient(Configuration(), 'ws' + sys.argv[1][4:], headers=None, "
        "capture_all=True, binary=True)\n"
        "c.write_stdin(b'hello\\n')\n"
        "c.close_channel(0)\n"
        "c.run_forever(timeout=30)\n"
        "print(json.dumps({'out': c.read_stdout().decode(), 'code': c.returncode}))\n"
    )
    out = subprocess.run(["nsenter", f"--net={streams.ns}", sys.executable, "-c", script, url],
                         capture_output=True, timeout=120, check=True)
    assert json.loads(out.stdout) == {"out": "got hello\n", "code": 4}


# -- attach ---------------------------------------------------------------------------------


def test_attach_to_a_running_tty_container(streams: Streams, env: Env) -> None:  # noqa: F811
    cid = env.run(env.pod(), "shell", ["sh"], tty=True, stdin=True)
    url = env.rt.Attach(pb.AttachRequest(container_id=cid, tty=True, stdin=True,
                                         stdout=True)).url
    result = env.tmp / "attach.json"
    proc = subprocess.Popen(streams.go_argv(url, result, "-tty", "-stdin",
                                            "-sizes", "100x40,120x45"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None
    seen = bytearray()
    try:
        time.sleep(0.5)  # output from now on: let the client join first
        proc.stdin.write(b"echo from-$((6*7))\n")
        proc.stdin.flush()
        wait_for(b"from-42", proc, seen)
        wait_for(b"40 100", proc, seen, ask=b"stty size\n")
        proc.send_signal(signal.SIGUSR1)
        wait_for(b"45 120", proc, seen, ask=b"stty size\n")
        proc.stdin.write(b"exit 0\n")  # the container's shell ends: so does the attach
        proc.stdin.flush()
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert exit_code(json.loads(result.read_text())) == 0
    assert env.wait_state(cid, pb.CONTAINER_EXITED).state == pb.CONTAINER_EXITED


def test_attach_ends_with_the_clients_stdin(streams: Streams, env: Env) -> None:  # noqa: F811
    """``echo abcd1234 | kubectl run --attach --stdin --leave-stdin-open -- sh -c 'cat &&
    echo stdin closed'``: the session ends with the client's stdin and the container keeps
    running, its stdin open (CRI-O, containerd). With ``stdin_once`` the container's stdin
    closes too, and the session lasts until the container exits."""
    pod = env.pod()
    cmd = ["sh", "-c", "cat && echo stdin closed"]
    cid = env.run(pod, "open", cmd, stdin=True)
    url = env.rt.Attach(pb.AttachRequest(container_id=cid, stdin=True, stdout=True,
                                         stderr=True)).url
    res, out = streams.go(str(url), "-stdin", "-stderr", stdin=b"abcd1234\n")
    assert (out, exit_code(res)) == (b"abcd1234\n", 0)
    assert env.status(cid).status.state == pb.CONTAINER_RUNNING
    once = env.run(pod, "once", cmd, stdin=True, stdin_once=True)
    url = env.rt.Attach(pb.AttachRequest(container_id=once, stdin=True, stdout=True,
                                         stderr=True)).url
    res, out = streams.go(str(url), "-stdin", "-stderr", stdin=b"abcd1234\n")
    assert (out, exit_code(res)) == (b"abcd1234\nstdin closed\n", 0)
    st = env.wait_state(once, pb.CONTAINER_EXITED)
    assert (st.state, st.exit_code) == (pb.CONTAINER_EXITED, 0)


# -- port forward ---------------------------------------------------------------------------


def test_port_forward_to_a_web_server(streams: Streams, env: Env) -> None:  # noqa: F811
    pod = env.pod()
    page = PAGE.decode()
    env.run(pod, "web", ["sh", "-c", f"mkdir -p /www && printf '{page}' > /www/index.html "
                         "&& exec /bin/busybox httpd -f -p 8080 -h /www"])
    url = env.rt.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod, port=[8080])).url
    deadline = time.monotonic() + 20
    while True:  # the server may take a moment to listen
        res, _ = streams.go(str(url), "-mode", "portforward", "-port", "8080",
                            "-request", "GET /index.html HTTP/1.0\r\n\r\n")
        if res["conns"][0]["error"] == "" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
        url = env.rt.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod)).url
    url = env.rt.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod, port=[8080])).url
    res, _ = streams.go(str(url), "-mode", "portforward", "-port", "8080", "-conns", "20",
                        "-request", "GET /index.html HTTP/1.0\r\n\r\n")
    conns = res["conns"]
    assert [c["error"] for c in conns] == [""] * 20
    assert {c["head"] for c in conns} == {"HTTP/1.1 200 OK"}
    assert len({c["sha256"] for c in conns}) == 1 and conns[0]["len"] > len(PAGE)
    url = env.rt.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod)).url
    res, _ = streams.go(str(url), "-mode", "portforward", "-port", "9")
    assert "connection refused" in res["conns"][0]["error"].lower()
    # crictl/critest -websocket-portforward: SPDY tunnelled in a WebSocket (KEP-4006)
    url = env.rt.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod)).url
    res, _ = streams.go(str(url), "-mode", "portforward", "-tunnel", "-port", "8080",
                        "-conns", "5", "-request", "GET /index.html HTTP/1.0\r\n\r\n")
    assert res["protocol"] == "portforward.k8s.io"
    assert [(c["head"], c["error"]) for c in res["conns"]] == [("HTTP/1.1 200 OK", "")] * 5
    # kubectl over WebSocket through kubelet: the upgrade reaches the URL without the
    # client's ?port=; the ports are the PortForward request's.
    url = str(env.rt.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod, port=[8080])).url)
    host = url.split("/")[2]
    assert streams.ns is not None
    with query_dropping_proxy(host, ("nsenter", f"--net={streams.ns}")) as proxied:
        out = subprocess.run(
            ["nsenter", f"--net={streams.ns}", sys.executable, "-c", WS_PORT_FORWARD,
             "ws" + url.replace(host, proxied)[len("http"):] + "?port=8080"],
            capture_output=True, timeout=60, check=True).stdout
    assert out.startswith(b"HTTP/1.1 200 OK") and PAGE in out


#: A WebSocket port-forward client as client-go's e2e test makes it (v4.channel.k8s.io):
#: the port on both channels first, then one HTTP/1.0 exchange on channel 0.
WS_PORT_FORWARD = """
import struct, sys
from websockets.sync.client import connect
with connect(sys.argv[1], subprotocols=["v4.channel.k8s.io"]) as ws:
    assert ws.recv() == b"\\x00" + struct.pack("<H", 8080)
    assert ws.recv() == b"\\x01" + struct.pack("<H", 8080)
    ws.send(b"\\x00GET /index.html HTTP/1.0\\r\\n\\r\\n")
    body = b""
    for m in ws:
        if m[0] == 0:
            body += m[1:]
        else:
            sys.exit(m[1:].decode())
sys.stdout.buffer.write(body)
"""
