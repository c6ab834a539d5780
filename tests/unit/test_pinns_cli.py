"""The pinns helper's own option parser and JSON writer (it imports neither argparse nor
json, to start fast), and that its import stays light."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from moorage.sandbox.namespaces import is_pinned, pin, unpin
from moorage.sandbox.pinns.__main__ import (
    Refused,
    _json,
    _parse_infra_args,
    _parse_pin_args,
)

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_pin_options_every_form() -> None:
    args = _parse_pin_args([
        "--dir=/ns", "--id", "abc", "--user", "--uid-map", "0:1000:10", "--gid-map=0:1000:10",
        "--net", "--ipc", "--hostname", "--odd-but-valid", "--sysctl", "a.b=1",
        "--sysctl=c.d=x=y",
    ])
    assert (args.dir, args.id, args.user, args.net, args.ipc, args.uts) == (
        "/ns", "abc", True, True, True, False)
    assert (args.uid_map, args.gid_map) == (["0:1000:10"], ["0:1000:10"])
    assert args.hostname == "--odd-but-valid"  # a value is taken as it comes
    assert args.sysctl == ["a.b=1", "c.d=x=y"]
    defaults = _parse_pin_args(["--dir", "/ns", "--id", "i"])
    assert (defaults.hostname, defaults.sysctl, defaults.user) == ("", [], False)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--id", "i"], "--dir is required"),
        (["--dir", "/ns"], "--id is required"),
        (["--dir", "/ns", "--id"], "--id needs a value"),
        (["--dir", "/ns", "--id", "i", "--pid"], "unknown argument '--pid'"),
        (["--dir", "/ns", "--id", "i", "--net=yes"], "unknown argument '--net=yes'"),
        (["--dir", "/ns", "--id", "i", "stray"], "unknown argument 'stray'"),
    ],
)
def test_pin_options_refused(argv: list[str], match: str) -> None:
    with pytest.raises(Refused, match=match):
        _parse_pin_args(argv)


def test_infra_options() -> None:
    args, command = _parse_infra_args(
        ["--user-ns=/u", "--cgroup-procs", "/a", "--cgroup-procs", "/b", "--", "/bin/x", "--y"])
    assert (args.user_ns, args.net_ns, args.cgroup_procs) == ("/u", None, ["/a", "/b"])
    assert command == ["/bin/x", "--y"]
    with pytest.raises(Refused, match="unknown argument '--pid-ns'"):
        _parse_infra_args(["--pid-ns", "/p", "--", "/bin/x"])


@pytest.mark.parametrize(
    "payload",
    [
        {"net": "/run/ns/net/abc", "ipc": "/run/ns/ipc/abc"},
        {"pid": 1234, "pid_ns": "/proc/1234/ns/pid"},
        {"error": 'quote " backslash \\ newline \n tab \t nul \0 del \x7f'},
        {"error": "non-ASCII é € 😀 and a lone surrogate \udcff from a path"},
        {"flag": True, "off": False, "none": None, "": ""},
    ],
)
def test_json_round_trips_through_json_loads(payload: dict[str, object]) -> None:
    text = _json(payload)
    assert text.isascii() and "\n" not in text
    assert json.loads(text) == payload


def test_helper_imports_no_heavy_module() -> None:
    """The helper runs once per pod: argparse, json, signal (enum) and re stay unimported."""
    probe = (
        "import sys; import moorage.sandbox.pinns.__main__; "
        "print(sorted(m for m in ('argparse', 'json', 'signal', 're', 'enum', 'typing') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-P", "-S", "-c", probe], capture_output=True, text=True, check=True,
        env={"PYTHONPATH": SRC},
    ).stdout
    assert out.strip() == "[]"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
async def test_pin_in_a_thread_leaves_this_process_in_its_namespaces(tmp_path: Path) -> None:
    """Without a user namespace the pins are made by a thread of the caller that ends
    afterwards: no other thread (the loop's, the pool's) changes namespace or hostname."""
    def mine() -> dict[str, int]:
        return {k: os.stat(f"/proc/thread-self/ns/{k}").st_ino for k in ("net", "ipc", "uts")}

    before, pool_before = mine(), await asyncio.to_thread(mine)
    hostname, threads = socket.gethostname(), threading.active_count()
    pinned = await pin(tmp_path, "sb", net=True, ipc=True, uts=True, hostname="pinned-pod",
                       sysctls={"net.ipv4.ping_group_range": "0 2147483647"})
    try:
        assert pinned.net and is_pinned(pinned.net)
        assert os.stat(pinned.net).st_ino != before["net"]
        assert (mine(), await asyncio.to_thread(mine)) == (before, pool_before)
        assert socket.gethostname() == hostname
        assert threading.active_count() <= threads + 1  # the pinning thread is ending
    finally:
        await unpin(pinned)
    assert not any(is_pinned(p) for p in pinned.paths())
