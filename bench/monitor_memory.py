"""Memory and start latency of a container monitor: moorage's fork server vs. alternatives.

Run as root on a machine with runc, conmon and busybox-static::

    sudo .venv/bin/python bench/monitor_memory.py [--containers 20] [--modes server,fresh,conmon]

For each mode it starts N busybox containers that print a line every 100 ms (so that every
monitor runs its log path), lets them run for a few seconds, then reads
``/proc/<pid>/smaps_rollup`` of every monitor and prints medians of RSS, PSS (split into
anonymous and file-backed) and private dirty memory. Modes:

- ``server``: moorage's monitor server forks one monitor per container (the design);
- ``fresh``: a fresh interpreter per container (``python -P -S -m moorage.monitor run``);
- ``conmon``: Debian's ``conmon`` (the C monitor CRI-O uses), told to create the container
  and report its pid on a sync pipe as CRI-O does.

Start latency: the median time from asking the monitor to create a container to its answer,
next to the median time of a bare ``runc create`` of an identical bundle (stdio on
``/dev/null``, no monitor), measured alternately; the difference is what the monitor adds.
Everything (containers, cgroups, monitors, the monitor server) is removed at the end.
Nothing leaves the machine. No run is a test: numbers vary with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from moorage.monitor.client import CreateRequest, MonitorClient
from moorage.util.helper import helper_env

RUNC = "/usr/sbin/runc"
CONMON = "/usr/bin/conmon"
BUSYBOX = "/bin/busybox"
COMMAND = ["/bin/sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done"]


def rollup(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0])
    return out


def make_rootfs(root: Path) -> Path:
    rootfs = root / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in ("sh", "sleep", "echo"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    return rootfs


def make_bundle(root: Path, rootfs: Path, name: str, cgroup_parent: str) -> Path:
    bundle = root / name
    bundle.mkdir()
    subprocess.run([RUNC, "spec"], cwd=bundle, check=True)
    config = json.loads((bundle / "config.json").read_text())
    config["root"] = {"path": str(rootfs), "readonly": True}
    config["process"]["terminal"] = False
    config["process"]["args"] = COMMAND
    config["linux"]["cgroupsPath"] = f"{cgroup_parent}/{name}"
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def runc(runc_root: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([RUNC, "--root", str(runc_root), *args], capture_output=True)


def bare_create(runc_root: Path, bundle: Path, cid: str) -> float:
    """Seconds a ``runc create`` takes with no monitor (stdio on /dev/null), then delete."""
    # runc hands its stdio to the container: a pipe here would stay open until it exits.
    with tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        done = subprocess.run(
            [
                RUNC,
                "--root",
                str(runc_root),
                "create",
                "--bundle",
                str(bundle),
                "--pid-file",
                str(bundle / "bare.pid"),
                cid,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        elapsed = time.perf_counter() - t
        if done.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"runc create {cid}: {err.read().decode()}")
    runc(runc_root, "delete", "-f", cid)
    return elapsed


def remove_cgroups(parent: str) -> None:
    """Remove the bench's cgroups in every v1 hierarchy, killing anything left in them."""
    for _ in range(50):
        left = False
        for controller in Path("/sys/fs/cgroup").iterdir():
            top = controller / parent.lstrip("/")
            if not top.is_dir():
                continue
            for path in [*sorted((p for p in top.rglob("*") if p.is_dir()), reverse=True), top]:
                with contextlib.suppress(OSError):
                    for pid in (path / "cgroup.procs").read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), 9)
                try:
                    path.rmdir()
                except OSError:
                    left = True
        if not left:
            return
        time.sleep(0.1)


class Mode:
    name = ""

    def __init__(self, root: Path, runner: asyncio.Runner) -> None:
        self.root = root
        self.runner = runner
        self.runc_root = root / "runc"

    def create(self, bundle: Path, cid: str) -> int:
        """Create (not start) the container; the monitor's pid."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def extra(self) -> dict[str, Any]:
        return {}


class ServerMode(Mode):
    name = "server"

    def __init__(self, root: Path, runner: asyncio.Runner) -> None:
        super().__init__(root, runner)
        self.client = MonitorClient(root / "run")
        runner.run(self.client.ensure_server())

    def create(self, bundle: Path, cid: str) -> int:
        created = self.runner.run(
            self.client.create(
                CreateRequest(
                    id=cid,
                    bundle=str(bundle),
                    runtime=RUNC,
                    runtime_root=str(self.runc_root),
                    runtime_args=[],
                    state_dir=str(bundle),
                    log_path=str(self.root / "logs" / f"{cid}.log"),
                )
            )
        )
        return created.monitor_pid

    def extra(self) -> dict[str, Any]:
        pid = self.client.server_pid
        return {"server": rollup(pid)} if pid else {}

    def close(self) -> None:
        self.runner.run(self.client.shutdown_server())


class FreshMode(Mode):
    name = "fresh"

    def create(self, bundle: Path, cid: str) -> int:
        mine, theirs = socket.socketpair()
        req = {
            "id": cid,
            "bundle": str(bundle),
            "runtime": RUNC,
            "runtime_root": str(self.runc_root),
            "runtime_args": [],
            "state_dir": str(bundle),
            "log_path": str(self.root / "logs" / f"{cid}.log"),
        }
        proc = subprocess.Popen(
            [sys.executable, "-P", "-S", "-m", "moorage.monitor", "run"],
            stdin=theirs.fileno(),
            stdout=subprocess.DEVNULL,
            env=helper_env(),
            cwd="/",
        )
        theirs.close()
        mine.sendall(json.dumps(req).encode() + b"\n")
        reply = mine.makefile("rb").readline()
        mine.close()
        proc.wait()
        answer = json.loads(reply)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return int(answer["monitor_pid"])


class ConmonMode(Mode):
    name = "conmon"

    def create(self, bundle: Path, cid: str) -> int:
        sync_r, sync_w = os.pipe()
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "_OCI_SYNCPIPE": "3",
        }
        argv = [
            CONMON,
            "--api-version",
            "1",
            "-c",
            cid,
            "-u",
            cid,
            "-n",
            cid,
            "-r",
            RUNC,
            "-b",
            str(bundle),
            "-p",
            str(bundle / "pidfile"),
            "-P",
            str(bundle / "conmon.pid"),
            "-l",
            f"k8s-file:{self.root / 'logs' / f'{cid}.log'}",
            "--exit-dir",
            str(bundle),
            "--socket-dir-path",
            str(bundle),
            "--runtime-arg",
            "--root",
            "--runtime-arg",
            str(self.runc_root),
            "--log-level",
            "error",
        ]
        null = os.open(os.devnull, os.O_RDWR)
        # fd 3 of conmon must be the sync pipe.
        pid = os.posix_spawn(
            CONMON,
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, sync_w, 3),
                (os.POSIX_SPAWN_DUP2, null, 0),
                (os.POSIX_SPAWN_DUP2, null, 1),
                (os.POSIX_SPAWN_DUP2, null, 2),
            ],
        )
        os.close(sync_w)
        os.close(null)
        reply = os.read(sync_r, 4096)
        os.close(sync_r)
        os.waitpid(pid, 0)
        if b'"data"' not in reply:
            raise RuntimeError(f"conmon: {reply!r}")
        return int((bundle / "conmon.pid").read_text())


MODES: dict[str, type[Mode]] = {m.name: m for m in (ServerMode, FreshMode, ConmonMode)}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_mode(mode_cls: type[Mode], n: int, settle: float, runner: asyncio.Runner) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"monbench-{mode_cls.name}-"))
    cgroup_parent = f"/moorage-bench-{secrets.token_hex(4)}"
    rootfs = make_rootfs(root)
    (root / "logs").mkdir()
    bundles = [make_bundle(root, rootfs, f"c{i}", cgroup_parent) for i in range(n)]
    bare = [make_bundle(root, rootfs, f"bare{i}", cgroup_parent) for i in range(n)]
    mode = mode_cls(root, runner)
    monitors: list[int] = []
    create_times: list[float] = []
    bare_times: list[float] = []
    try:
        bare_create(mode.runc_root, bare[0], "warm-up")  # page cache, not counted
        for i, bundle in enumerate(bundles):
            bare_times.append(bare_create(mode.runc_root, bare[i], f"bare{i}"))
            t = time.perf_counter()
            monitors.append(mode.create(bundle, f"c{i}"))
            create_times.append(time.perf_counter() - t)
            started = runc(mode.runc_root, "start", f"c{i}")
            if started.returncode != 0:
                raise RuntimeError(f"runc start c{i}: {started.stderr.decode()}")
        time.sleep(settle)
        stats = [rollup(pid) for pid in monitors]
        extra = mode.extra()
    finally:
        for i in range(n):
            runc(mode.runc_root, "delete", "-f", f"c{i}")
        mode.close()
        remove_cgroups(cgroup_parent)
        shutil.rmtree(root, ignore_errors=True)
    return {
        "mode": mode_cls.name,
        "n": n,
        "rss_kib": median([s["Rss"] for s in stats]),
        "pss_kib": median([s["Pss"] for s in stats]),
        "pss_anon_kib": median([s.get("Pss_Anon", 0) for s in stats]),
        "pss_file_kib": median([s.get("Pss_File", 0) for s in stats]),
        "private_dirty_kib": median([s["Private_Dirty"] for s in stats]),
        "create_ms": median(create_times) * 1000,
        "bare_runc_create_ms": median(bare_times) * 1000,
        "added_ms": (median(create_times) - median(bare_times)) * 1000,
        **{k: {"rss_kib": v["Rss"], "pss_kib": v["Pss"]} for k, v in extra.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--containers", type=int, default=20)
    parser.add_argument("--modes", default="server,fresh,conmon")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of output first")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (runc)")
    results = []
    with asyncio.Runner() as runner:
        for name in args.modes.split(","):
            if name == "conmon" and not os.path.exists(CONMON):
                print(f"{CONMON} missing: skipping conmon")
                continue
            results.append(run_mode(MODES[name], args.containers, args.settle, runner))
    print(
        f"{'mode':8} {'n':>3} {'RSS KiB':>8} {'PSS KiB':>8} {'anon':>6} {'file':>6} "
        f"{'priv KiB':>8} {'create ms':>9} {'bare ms':>8} {'added ms':>8}"
    )
    for r in results:
        print(
            f"{r['mode']:8} {r['n']:>3} {r['rss_kib']:>8.0f} {r['pss_kib']:>8.0f} "
            f"{r['pss_anon_kib']:>6.0f} {r['pss_file_kib']:>6.0f} "
            f"{r['private_dirty_kib']:>8.0f} {r['create_ms']:>9.1f} "
            f"{r['bare_runc_create_ms']:>8.1f} {r['added_ms']:>8.1f}"
        )
        if "server" in r:
            print(
                f"{'':8} monitor server: RSS {r['server']['rss_kib']} KiB, "
                f"PSS {r['server']['pss_kib']} KiB (one per node)"
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
