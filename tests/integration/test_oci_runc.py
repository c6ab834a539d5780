"""The runtime adapter against real runc (root): a busybox bundle made here, ``runc create``
run by the test (the monitor does it in production), then everything else through
``OciRuntime``.

Every container is force-deleted and its cgroups (under a unique ``/moorage-test-<hex>``)
removed afterwards, also when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from moorage.errors import DeadlineExceeded, FailedPrecondition
from moorage.oci import OciRuntime, OciRuntimeError
from moorage.oci.runtime import _stat_fields

RUNC = shutil.which("runc") or "/usr/sbin/runc"
BUSYBOX = Path("/bin/busybox")
CGROUP_ROOT = Path("/sys/fs/cgroup")

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not os.path.exists(RUNC), reason="needs runc"),
    pytest.mark.skipif(not BUSYBOX.exists(), reason="needs busybox-static"),
]

APPLETS = ("sh", "echo", "sleep", "cat", "head", "id", "pwd", "true", "wc", "kill", "ps")
#: The container's init: exits 0 on SIGTERM (PID 1 has no default signal actions).
INIT = ["sh", "-c", "trap 'exit 0' TERM; sleep 100000 & wait"]


def _hierarchies() -> list[Path]:
    """Every cgroup hierarchy root of this host (v1 controllers, named, unified)."""
    roots: list[Path] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        if post.split()[0] in ("cgroup", "cgroup2"):
            roots.append(Path(pre.split()[4]))
    return roots


def _remove_cgroup_tree(name: str) -> None:
    for hierarchy in _hierarchies():
        base = hierarchy / name
        if not base.exists():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(base), key=lambda w: -len(w[0])):
            procs = Path(dirpath) / "cgroup.procs"
            with contextlib.suppress(OSError):
                for pid in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


@dataclass
class Env:
    tmp: Path
    runtime: OciRuntime
    cgroup_top: str
    created: list[str]

    def create(self, cid: str, args: list[str] | None = None) -> Path:
        """A bundle and ``runc create`` (stdio to files), as the monitor would."""
        bundle = self.tmp / f"bundle-{cid}"
        rootfs = bundle / "rootfs"
        for d in ("bin", "proc", "sys", "dev", "tmp", "etc"):
            (rootfs / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
        for applet in APPLETS:
            (rootfs / "bin" / applet).symlink_to("busybox")
        subprocess.run([RUNC, "spec"], cwd=bundle, check=True)
        config: dict[str, Any] = json.loads((bundle / "config.json").read_text())
        config["process"]["terminal"] = False
        config["process"]["args"] = args or INIT
        config["process"]["env"] = ["PATH=/bin", "IN_SPEC=yes"]
        config["linux"]["cgroupsPath"] = f"/{self.cgroup_top}/{cid}"
        (bundle / "config.json").write_text(json.dumps(config))
        log = bundle / "stdio.log"
        with open(log, "wb") as out:
            self.created.append(cid)
            proc = subprocess.run(
                [RUNC, *self.runtime.global_args, "create", "--bundle", str(bundle), cid],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                timeout=60,
            )
        assert proc.returncode == 0, log.read_text()
        return bundle

    def memory_cgroup(self, cid: str) -> Path:
        return CGROUP_ROOT / "memory" / self.cgroup_top / cid


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    top = f"moorage-test-{secrets.token_hex(4)}"
    e = Env(tmp_path, OciRuntime("runc", RUNC, tmp_path / "runc-root"), top, [])
    try:
        yield e
    finally:
        for cid in e.created:
            subprocess.run(
                [RUNC, *e.runtime.global_args, "delete", "--force", cid],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=60,
                check=False,
            )
        _remove_cgroup_tree(top)
        assert not any((h / top).exists() for h in _hierarchies())


def _zombie_children() -> list[int]:
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat_fields(int(name))
            if st is not None and st[1] == me and st[0] == "Z":
                found.append(int(name))
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode() for a in raw.split(b"\0") if a]


async def _wait_status(rt: OciRuntime, cid: str, status: str) -> dict[str, Any]:
    """Poll ``state`` until ``status`` (bounded; not a timing assertion)."""
    for _ in range(200):
        state = await rt.state(cid)
        assert state is not None
        if state["status"] == status:
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"{cid} never became {status}: {state}")


# -- the tests -------------------------------------------------------------------------------


async def test_lifecycle(env: Env) -> None:
    rt = env.runtime
    cid = "life"
    bundle = env.create(cid)
    state = await rt.state(cid)
    assert state is not None
    assert state["status"] == "created"
    assert state["bundle"] == str(bundle)
    assert state["pid"] > 0

    await rt.start(cid)
    state = await _wait_status(rt, cid, "running")
    init_pid = state["pid"]
    assert init_pid in await rt.ps(cid)

    # Update: the memory limit shows in the container's cgroup.
    limit = 64 * 1024 * 1024
    await rt.update(cid, {"memory": {"limit": limit}})
    mem = env.memory_cgroup(cid) / "memory.limit_in_bytes"
    if mem.exists():
        assert int(mem.read_text()) == limit
    else:  # cgroup v2 only
        unified = CGROUP_ROOT / env.cgroup_top / cid / "memory.max"
        assert int(unified.read_text()) == limit
    await rt.update(cid, {"cpu": {"shares": 512}})

    await rt.pause(cid)
    assert (await rt.state(cid) or {})["status"] == "paused"
    await rt.resume(cid)
    assert (await rt.state(cid) or {})["status"] == "running"

    with pytest.raises(OciRuntimeError, match="delete"):
        await rt.delete(cid)  # running: refused without force

    await rt.kill(cid, signal.SIGTERM)
    await _wait_status(rt, cid, "stopped")
    await rt.kill(cid, "KILL")  # already stopped: fine
    await rt.kill(cid, "SIGKILL", all_processes=True)
    with pytest.raises(FailedPrecondition):
        await rt.exec_sync(cid, ["true"], timeout=5)  # nothing to exec in
    await rt.delete(cid)
    assert await rt.state(cid) is None
    await rt.delete(cid)  # again: fine
    await rt.delete(cid, force=True)
    await rt.kill(cid, signal.SIGKILL)  # missing: fine
    with pytest.raises(OciRuntimeError, match="does not exist"):
        await rt.start(cid)
    assert _zombie_children() == []


async def test_exec_sync(env: Env) -> None:
    rt = env.runtime
    cid = "execs"
    env.create(cid)
    await rt.start(cid)

    r = await rt.exec_sync(cid, ["echo", "hi"], timeout=10)
    assert (r.exit_code, r.stdout, r.stderr, r.timed_out, r.truncated) == (
        0,
        b"hi\n",
        b"",
        False,
        False,
    )
    r = await rt.exec_sync(cid, ["sh", "-c", "exit 7"], timeout=None)
    assert r.exit_code == 7
    r = await rt.exec_sync(cid, ["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=0)
    assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    r = await rt.exec_sync(cid, ["sh", "-c", "kill -9 $$"], timeout=10)
    assert r.exit_code == 128 + 9
    # Environment: the container's own plus ours; cwd and user.
    r = await rt.exec_sync(
        cid,
        ["sh", "-c", 'echo "$IN_SPEC $FOO"; pwd; id -u; id -g'],
        timeout=10,
        env=["FOO=bar baz"],
        cwd="/tmp",
        user="1000:1001",
    )
    assert r.stdout == b"yes bar baz\n/tmp\n1000\n1001\n", r.stderr
    # A command that does not exist: the runtime's own error, not an exit code.
    with pytest.raises(OciRuntimeError, match="no-such-command"):
        await rt.exec_sync(cid, ["no-such-command"], timeout=10)
    with pytest.raises(OciRuntimeError, match="does not exist"):
        await rt.exec_sync("no-such-container", ["true"], timeout=10)
    assert _zombie_children() == []


async def test_exec_sync_caps_output(env: Env) -> None:
    rt = env.runtime
    cid = "big"
    env.create(cid)
    await rt.start(cid)
    cap = 1024 * 1024
    r = await rt.exec_sync(
        cid,
        ["sh", "-c", "head -c 20971520 /dev/zero; head -c 3000000 /dev/zero >&2; echo done >&2"],
        timeout=60,
        max_output=cap,
    )
    assert r.exit_code == 0
    assert r.truncated
    assert r.stdout == b"\0" * cap
    assert r.stderr == b"\0" * cap
    # Default cap (16 MiB) with 20 MiB of output.
    r = await rt.exec_sync(cid, ["head", "-c", "20971520", "/dev/zero"], timeout=60)
    assert len(r.stdout) == 16 * 1024 * 1024 and r.truncated
    r = await rt.exec_sync(cid, ["head", "-c", "1000", "/dev/zero"], timeout=60, max_output=1000)
    assert len(r.stdout) == 1000 and not r.truncated


async def test_exec_sync_timeout_kills_everything(env: Env) -> None:
    rt = env.runtime
    cid = "slow"
    env.create(cid)
    await rt.start(cid)
    before = set(await rt.ps(cid))

    with pytest.raises(DeadlineExceeded, match=r"'sleep 123'.*timed out after 1s"):
        await rt.exec_sync(cid, ["sleep", "123"], timeout=1)
    after = set(await rt.ps(cid))
    assert after == before
    assert not any("123" in _cmdline(p) for p in after)

    # Children in the background of the exec'd shell go too (same process group).
    with pytest.raises(DeadlineExceeded):
        await rt.exec_sync(
            cid, ["sh", "-c", "sleep 201 & sleep 202 & echo started; wait"], timeout=1
        )
    assert set(await rt.ps(cid)) == before
    # No runc left behind, no zombie of ours.
    assert not [
        p
        for p in map(int, filter(str.isdigit, os.listdir("/proc")))
        if "exec" in _cmdline(p) and cid in _cmdline(p)
    ]
    assert _zombie_children() == []

    # CRI-O's answer instead of an error: exit code -1 and what was printed so far.
    r = await rt.exec_sync(
        cid, ["sh", "-c", "echo partial; sleep 300"], timeout=1, raise_on_timeout=False
    )
    assert (r.exit_code, r.timed_out, r.stdout) == (-1, True, b"partial\n")
    assert set(await rt.ps(cid)) == before

    # A cancelled exec (the client went away) is cleaned up the same way.
    task = asyncio.create_task(rt.exec_sync(cid, ["sleep", "124"], timeout=None))
    for _ in range(100):
        if len(set(await rt.ps(cid))) > len(before):
            break
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert set(await rt.ps(cid)) == before
    assert _zombie_children() == []


async def test_version_and_features(env: Env) -> None:
    rt = env.runtime
    version = await rt.version()
    assert re.match(r"^\d+\.\d+", version), version
    features = await rt.features()
    assert isinstance(features, dict)
    if features:  # runc >= 1.1
        assert features["ociVersionMin"].startswith("1.")
        assert await rt.supports_mount_option("rro") == ("rro" in features["mountOptions"])
    assert await rt.state("never-created") is None


async def test_missing_binary(tmp_path: Path) -> None:
    rt = OciRuntime("runc-missing", "runc-does-not-exist-here", tmp_path)
    with pytest.raises(OciRuntimeError, match="runtime handler 'runc-missing'"):
        await rt.version()
