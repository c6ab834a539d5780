"""What the monitor and the daemon share (moorage.monitor.protocol), without processes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from moorage.monitor import protocol as P


def good_request(**changes: Any) -> dict[str, Any]:
    req: dict[str, Any] = {
        "id": "abc123",
        "bundle": "/run/b",
        "runtime": "/usr/sbin/runc",
        "runtime_root": "/run/runc",
        "runtime_args": ["--systemd-cgroup"],
        "state_dir": "/run/b",
        "log_path": "/var/log/pods/x/c/0.log",
        "tty": False,
        "stdin": True,
        "stdin_once": True,
        "log_max_line": 16384,
        "cgroup_memory_dir": "/sys/fs/cgroup/memory/pod/c",
    }
    req.update(changes)
    return req


def test_good_request() -> None:
    assert P.request_problem(good_request()) is None
    minimal = {k: good_request()[k] for k in ("id", "bundle", "runtime", "runtime_root")}
    minimal.update(state_dir="/s", log_path="/l")
    assert P.request_problem(minimal) is None


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"id": ""}, "container id"),
        ({"id": "a/b"}, "container id"),
        ({"id": ".."}, "container id"),
        ({"bundle": "relative"}, "'bundle' must be an absolute path"),
        ({"log_path": 3}, "'log_path' must be a string"),
        ({"state_dir": "/a\0b"}, "NUL"),
        ({"tty": "yes"}, "'tty' must be a boolean"),
        ({"runtime_args": "--debug"}, "runtime_args"),
        ({"runtime_args": [1]}, "runtime_args"),
        ({"log_max_line": 0}, "log_max_line"),
        ({"log_max_line": True}, "log_max_line"),
        ({"cgroup_memory_dir": "rel"}, "cgroup_memory_dir"),
        ({"timeout": -1}, "timeout"),
        ({"stdin": False, "stdin_once": True}, "stdin_once needs stdin"),
    ],
)
def test_bad_requests_name_the_field(changes: dict[str, Any], words: str) -> None:
    problem = P.request_problem(good_request(**changes))
    assert problem is not None and words in problem


def test_not_an_object() -> None:
    assert P.request_problem([1]) == "the request is not a JSON object"


def test_runtime_argv() -> None:
    req = good_request()
    assert P.runtime_argv(req, None) == [
        "/usr/sbin/runc", "--root", "/run/runc", "--systemd-cgroup",
        "create", "--bundle", "/run/b", "--pid-file", "pidfile", "abc123",
    ]  # fmt: skip
    argv = P.runtime_argv(good_request(runtime_root="", runtime_args=[]), "console.sock")
    assert argv == [
        "/usr/sbin/runc", "create", "--bundle", "/run/b", "--pid-file", "pidfile",
        "--console-socket", "console.sock", "abc123",
    ]  # fmt: skip


def test_exit_code_of_wait_statuses() -> None:
    assert P.exit_code_of(0) == (0, None)
    assert P.exit_code_of(3 << 8) == (3, None)
    assert P.exit_code_of(9) == (137, 9)  # killed by SIGKILL
    assert P.exit_code_of(15 | 0x80) == (143, 15)  # SIGTERM, core dumped


def test_exit_file_round_trip() -> None:
    raw = P.encode_exit(137, 1_700_000_000_123_456_789, True, 9)
    assert raw.endswith(b"\n")
    assert json.loads(raw) == {
        "exit_code": 137, "exited_at": 1_700_000_000_123_456_789, "oom_killed": True, "signal": 9,
    }  # fmt: skip
    assert P.decode_exit(raw) == json.loads(raw)
    assert P.decode_exit(P.encode_exit(0, 5, False, None)) == {
        "exit_code": 0, "exited_at": 5, "oom_killed": False, "signal": None,
    }  # fmt: skip


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"[1]",
        b'{"exit_code": 1}',
        b'{"exit_code": "1", "exited_at": 1, "oom_killed": false, "signal": null}',
        b'{"exit_code": 1, "exited_at": 1, "oom_killed": 0, "signal": null}',
        b'{"exit_code": true, "exited_at": 1, "oom_killed": false, "signal": null}',
        b'{"exit_code": 1, "exited_at": 1, "oom_killed": false, "signal": "KILL"}',
        b"\xff\xfe",
    ],
)
def test_decode_exit_refuses_partial_or_wrong_records(raw: bytes) -> None:
    assert P.decode_exit(raw) is None


V1_OOM_CONTROL = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"
V2_EVENTS = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 1\noom_group_kill 0\n"


def test_oom_kill_counters() -> None:
    assert P.oom_kill_count(V1_OOM_CONTROL) == 2
    assert P.oom_kill_count(V2_EVENTS) == 1
    assert P.oom_kill_count("oom_kill_disable 0\nunder_oom 0\n") is None  # kernel < 4.13
    assert P.oom_kill_count("oom_kill x\n") is None


def test_read_oom_kills_v1_and_v2_trees(tmp_path: Path) -> None:
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "memory.oom_control").write_text(V1_OOM_CONTROL)
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.events").write_text(V2_EVENTS)
    (v2 / "memory.oom_control").write_text("oom_kill 99\n")  # v2 has none: events wins
    assert P.read_oom_kills(str(v1)) == 2
    assert P.read_oom_kills(str(v2)) == 1
    assert P.read_oom_kills(str(tmp_path / "gone")) is None
    assert P.read_oom_kills("") is None


def test_oom_killed_compares_with_the_count_at_start() -> None:
    assert P.oom_killed(0, 1)
    assert P.oom_killed(None, 1)  # no counter readable at start: the cgroup is new
    assert not P.oom_killed(3, 3)  # a cumulative counter of an older container
    assert not P.oom_killed(1, None)
    assert not P.oom_killed(None, None)


def test_parse_ctl() -> None:
    assert P.parse_ctl(b"reopen") == ("reopen", 0, 0)
    assert P.parse_ctl(b"resize 24 80\n") == ("resize", 24, 80)
    for bad in (b"resize 24", b"resize a b", b"resize 0 80", b"resize 24 70000", b"kill"):
        with pytest.raises(ValueError):
            P.parse_ctl(bad)


def test_socket_address_for_long_paths(tmp_path: Path) -> None:
    short = str(tmp_path / "s")
    assert P.socket_address(short) == (short, None)
    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    address, fd = P.socket_address(str(deep / "attach"))
    try:
        assert fd is not None
        assert address == f"/proc/self/fd/{fd}/attach"
        assert os.path.samefile(os.path.dirname(address), deep)
    finally:
        if fd is not None:
            os.close(fd)


@pytest.mark.parametrize(
    "doc",
    [
        {"a": 1, "b": [1, 'x"\\é\n\u2028'], "c": None, "d": True, "e": False},
        [],
        {},
        "héllo",
        -5,
        {"error": 'runc create failed: exec: "/x": no such file', "kind": "runtime"},
    ],
)
def test_json_without_the_json_package(doc: Any) -> None:
    text = P.dumps(doc)
    assert text == json.dumps(doc)
    assert P.loads(text) == doc
    assert P.loads(json.dumps(doc, indent=2) + "\n") == doc


@pytest.mark.parametrize("bad", ["", "x", '{"a": 1} x', "NaN", "[1,]", '{"a": 1', "Infinity"])
def test_loads_refuses_what_json_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        P.loads(bad)


def test_dumps_refuses_other_types() -> None:
    with pytest.raises(TypeError):
        P.dumps({"x": 1.5})


def test_code_digest_is_stable() -> None:
    assert P.code_digest() == P.code_digest()
    assert P.code_digest().startswith(f"{P.PROTOCOL_VERSION}-")
