"""moorage.util.proc: children spawned from a worker thread, awaited through a pidfd."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from moorage.util import proc
from tests.fixtures.netns import current_netns_inode, entered, netns


async def test_communicate_pipes_and_exit_code() -> None:
    p = await proc.spawn(["/bin/sh", "-c", "cat; echo err >&2; exit 3"],
                         stdin=proc.PIPE, stdout=proc.PIPE, stderr=proc.PIPE)
    out, err = await p.communicate(b"x" * 300_000)  # more than a pipe holds
    assert (out, err, p.returncode) == (b"x" * 300_000, b"err\n", 3)
    assert await p.wait() == 3


async def test_new_session() -> None:
    p = await proc.spawn(["/bin/sh", "-c", "read -r _ _ _ _ _ sid _ < /proc/self/stat; "
                          "echo $sid"], stdout=proc.PIPE, start_new_session=True)
    out, _ = await p.communicate()
    assert int(out) == p.pid  # the shell leads a session of its own


async def test_spawn_happens_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    real_popen = subprocess.Popen

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        threads.append(threading.current_thread().name)
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    p = await proc.spawn(["/bin/true"])
    assert await p.wait() == 0
    assert len(threads) == 1 and threads[0] != threading.current_thread().name
    assert threads[0].startswith("moorage-spawn")


async def test_signal_death_and_kill() -> None:
    p = await proc.spawn(["/bin/sleep", "30"])
    assert p.returncode is None
    p.send_signal(signal.SIGTERM)
    assert await p.wait() == -signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        p.kill()  # reaped: its pid may be another process's now


async def test_concurrent_waits_and_fd_outputs(tmp_path: Path) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        p = await proc.spawn(["/bin/sh", "-c", "echo to-fd"], stdout=w)
        os.close(w)
        w = -1
        codes = await asyncio.gather(p.wait(), p.wait(), p.wait())
        assert list(codes) == [0, 0, 0]
        assert os.read(r, 100) == b"to-fd\n"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


async def test_missing_binary_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await proc.spawn([str(tmp_path / "nope")])
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(PermissionError):
        await proc.spawn([str(script)])


async def test_cancelled_communicate_leaves_the_child_to_the_caller() -> None:
    p = await proc.spawn(["/bin/sleep", "30"], stdout=proc.PIPE, start_new_session=True)
    task = asyncio.ensure_future(p.communicate())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert p.returncode is None  # still running: the caller kills it, as runtime._run does
    os.killpg(p.pid, signal.SIGKILL)
    assert await asyncio.wait_for(p.wait(), 30) == -signal.SIGKILL


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
async def test_child_gets_the_callers_network_namespace(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    threads: list[str] = []
    real_popen = subprocess.Popen

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        if args and args[0][0] == "/bin/readlink":  # not the netns fixtures' own `ip`
            threads.append(threading.current_thread().name)
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)

    def ns_of(pid_out: bytes) -> int:
        return int(pid_out.split(b"[")[1].split(b"]")[0])

    async def child_netns() -> int:
        p = await proc.spawn(["/bin/readlink", "/proc/self/ns/net"], stdout=proc.PIPE)
        out, _ = await p.communicate()
        return ns_of(out)

    assert await child_netns() == current_netns_inode()
    with netns("mrgproc") as ns, entered(ns.path):
        inside = current_netns_inode()
        assert await child_netns() == inside  # not the pool threads' namespace
    assert await child_netns() != inside
    # Every spawn, in either namespace, ran on a pool thread: one pool per namespace.
    assert len(threads) == 3 and all(t.startswith("moorage-spawn") for t in threads)
