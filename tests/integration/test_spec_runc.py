"""Specs from build_spec run by the real runc (root): what the container's process sees.

A busybox rootfs (Debian's busybox-static) with an /etc/passwd (root, nobody, app:1000) and
an /etc/group (staff lists app) is built once; each test builds a spec, runs it in the
foreground with ``runc run`` and reads the process's output: its ids and groups, its
capabilities, read-only rootfs and mounts, masked paths, the pod's files, environment and
working directory, its memory limit, devices, and what a privileged container gets. The
containers share the host's network and IPC namespaces (the sandbox view says so); the UTS
namespace is a pinned one where the hostname is checked. Containers and their cgroups are
removed afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from moorage.container.defaults import CAPABILITY_NAMES
from moorage.container.model import (
    ContainerResources,
    ContainerSpec,
    Device,
    ImageView,
    Mount,
    SandboxView,
    SecurityContext,
)
from moorage.container.spec import SpecOptions, build_spec, host_capabilities, host_devices
from moorage.container.users import resolve_user
from moorage.sandbox.cgroups import Layout, Resources

RUNC = shutil.which("runc")
BUSYBOX = Path("/bin/busybox")

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(RUNC is None, reason="runc is not installed"),
    pytest.mark.skipif(not BUSYBOX.exists(), reason="busybox-static is not installed"),
]

APPLETS = (
    "sh", "id", "cat", "ls", "grep", "touch", "wc", "env", "pwd", "hostname", "echo", "head",
)  # fmt: skip

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
app:x:1000:1000:app:/home/app:/bin/sh
"""
GROUP = """\
root:x:0:
staff:x:50:app
app:x:1000:
nogroup:x:65534:
"""

DEFAULT_CAPS = ("CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "SETGID", "SETUID", "SETPCAP",
                "NET_BIND_SERVICE", "KILL")  # fmt: skip
CAP_BITS = {"CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "FSETID": 4, "KILL": 5, "SETGID": 6,
            "SETUID": 7, "SETPCAP": 8, "NET_BIND_SERVICE": 10, "NET_ADMIN": 12}  # fmt: skip


def mask(*names: str) -> int:
    return sum(1 << CAP_BITS[n] for n in names)


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("spec-rootfs") / "rootfs"
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "home/app", "data", "rw"):
        (root / d).mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    os.chmod(root / "tmp", 0o1777)
    return root


@pytest.fixture(scope="module")
def files_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pod-files")
    (d / "hostname").write_text("web-0\n")
    (d / "hosts").write_text("127.0.0.1 localhost\n10.1.2.3 web-0\n")
    (d / "resolv.conf").write_text("nameserver 10.96.0.10\nsearch default.svc.cluster.local\n")
    return d


@pytest.fixture(scope="module")
def cgroup_parent() -> Iterator[str]:
    name = f"/moorage-spec-test-{secrets.token_hex(4)}"
    yield name
    for point in Layout.detect().hierarchies():
        base = point / name.lstrip("/")
        if not base.exists():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(base), key=lambda w: -len(w[0])):
            for pid in (Path(dirpath) / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


@pytest.fixture(scope="module")
def uts_ns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A pinned UTS namespace whose hostname is web-0 (as the sandbox's pinner makes)."""
    path = tmp_path_factory.mktemp("ns") / "uts"
    path.touch()
    subprocess.run(["unshare", f"--uts={path}", "hostname", "web-0"], check=True)
    yield str(path)
    subprocess.run(["umount", str(path)], check=False)


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def lines(self) -> dict[str, str]:
        """``key=value`` lines of the output."""
        out: dict[str, str] = {}
        for line in self.out.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                out[key] = value
        return out


@pytest.fixture
def run(tmp_path: Path, rootfs: Path, files_dir: Path, cgroup_parent: str) -> Iterator[Any]:
    state = tmp_path / "runc"
    started: list[str] = []

    def runner(
        script: str,
        *,
        image_user: str = "",
        sandbox: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
        **spec_kw: Any,
    ) -> Result:
        cid = f"spec-{secrets.token_hex(6)}"
        sec = spec_kw.pop("sec", {})
        spec = ContainerSpec(
            name="app", attempt=0, image="busybox", command=("sh", "-c", script),
            security=SecurityContext(**sec), **spec_kw,
        )  # fmt: skip
        image = ImageView(
            id="sha256:test", ref="sha256:test", name="busybox:test",
            config={"User": image_user, "Env": ["FROM_IMAGE=1"]}, layers=(),
        )  # fmt: skip
        view = SandboxView(
            id="sb-test", name="web", namespace="default", uid="uid-1",
            cgroup_parent=cgroup_parent, net_ns=None, ipc_ns=None, uts_ns=None, pid_ns=None,
            files_dir=str(files_dir), shm_path=None, hostname="web-0",
            log_directory=str(tmp_path),
        )  # fmt: skip
        if sandbox:
            view = replace(view, **sandbox)
        user = resolve_user(rootfs, spec, image)
        opts = SpecOptions(restrict_oom_score_adj=True, **(options or {}))
        doc = build_spec(
            container_id=cid, spec=spec, sandbox=view, image=image, rootfs=rootfs,
            user=user, options=opts,
        )  # fmt: skip
        bundle = tmp_path / cid
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps(doc))
        started.append(cid)
        proc = subprocess.run(
            [RUNC or "runc", "--root", str(state), "run", "--bundle", str(bundle), cid],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        return Result(proc.returncode, proc.stdout, proc.stderr)

    yield runner
    for cid in started:
        subprocess.run(
            [RUNC or "runc", "--root", str(state), "delete", "-f", cid],
            capture_output=True, check=False,
        )  # fmt: skip


def status_caps(result: Result) -> dict[str, int]:
    caps: dict[str, int] = {}
    for line in result.out.splitlines():
        if line.startswith("Cap"):
            key, value = line.split(":")
            caps[key] = int(value.strip(), 16)
    return caps


# -- tests ----------------------------------------------------------------------------------------


def test_identity_env_cwd(run: Any) -> None:
    r = run(
        "echo uid=$(id -u); echo gid=$(id -g); echo groups=$(id -G); echo cwd=$(pwd); env",
        image_user="app",
        working_dir="/work/dir",
        env=(("GREETING", b"hello"), ("FROM_IMAGE", b"2")),
        sec={"supplemental_groups": (2000,)},
    )
    assert r.rc == 0, r.err
    out = r.lines()
    assert (out["uid"], out["gid"]) == ("1000", "1000")
    assert set(out["groups"].split()) == {"1000", "50", "2000"}
    assert out["cwd"] == "/work/dir"  # created by runc
    assert out["GREETING"] == "hello" and out["FROM_IMAGE"] == "2"
    assert out["HOME"] == "/home/app" and out["HOSTNAME"] == "web-0"
    assert out["PATH"].startswith("/usr/local/sbin:")


def test_strict_groups_and_run_as_user(run: Any) -> None:
    r = run(
        "echo uid=$(id -u); echo gid=$(id -g); echo groups=$(id -G)",
        sec={"run_as_user": 1000, "run_as_group": 3000, "supplemental_groups_policy": "strict"},
    )
    assert r.rc == 0, r.err
    out = r.lines()
    assert (out["uid"], out["gid"], out["groups"].split()) == ("1000", "3000", ["3000"])


def test_capabilities_root(run: Any) -> None:
    r = run("grep Cap /proc/self/status", sec={"cap_add": ("NET_ADMIN",), "cap_drop": ("CHOWN",)})
    assert r.rc == 0, r.err
    caps = status_caps(r)
    wanted = mask(*[c for c in DEFAULT_CAPS if c != "CHOWN"], "NET_ADMIN")
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapBnd"] == wanted
    assert caps["CapInh"] == caps["CapAmb"] == 0


def test_capabilities_non_root(run: Any) -> None:
    r = run("grep Cap /proc/self/status", image_user="app")
    assert r.rc == 0, r.err
    caps = status_caps(r)
    assert caps["CapEff"] == caps["CapPrm"] == 0  # execve as non-root drops them
    assert caps["CapBnd"] == mask(*DEFAULT_CAPS)
    r = run(
        "grep Cap /proc/self/status", image_user="app",
        sec={"cap_add_ambient": ("NET_BIND_SERVICE",)},
    )  # fmt: skip
    assert r.rc == 0, r.err
    caps = status_caps(r)
    assert caps["CapEff"] == caps["CapAmb"] == mask("NET_BIND_SERVICE")


def test_readonly_rootfs_and_mounts(run: Any, tmp_path: Path) -> None:
    ro_dir, rw_dir = tmp_path / "ro", tmp_path / "rw"
    ro_dir.mkdir()
    rw_dir.mkdir()
    (ro_dir / "seen").write_text("from host\n")
    r = run(
        "touch /newfile && echo root=rw || echo root=ro;"
        "touch /data/x && echo data=rw || echo data=ro;"
        "touch /rw/x && echo rwmount=rw || echo rwmount=ro;"
        "echo seen=$(cat /data/seen)",
        sec={"readonly_rootfs": True},
        mounts=(Mount("/data", str(ro_dir), readonly=True), Mount("/rw", str(rw_dir))),
    )
    assert r.rc == 0, r.err
    out = r.lines()
    assert (out["root"], out["data"], out["rwmount"]) == ("ro", "ro", "rw")
    assert out["seen"] == "from host"
    assert (rw_dir / "x").exists() and not (ro_dir / "x").exists()


def test_masked_and_readonly_paths(run: Any) -> None:
    r = run(
        "echo keys=$(wc -c < /proc/keys); echo acpi=$(ls /proc/acpi | wc -l);"
        "echo timer=$(wc -c < /proc/timer_list);"
        "grep ' /proc/sys ' /proc/self/mountinfo | head -1"
    )
    assert r.rc == 0, r.err
    out = r.lines()
    assert out["keys"] == "0" and out["timer"] == "0"  # bound to /dev/null
    if Path("/proc/acpi").exists():
        assert out["acpi"] == "0"  # an empty read-only tmpfs
    assert " /proc/sys ro," in r.out


def test_pod_files_and_hostname(run: Any, uts_ns: str) -> None:
    r = run(
        "echo name=$(cat /etc/hostname); echo host=$(hostname); cat /etc/resolv.conf /etc/hosts",
        sandbox={"uts_ns": uts_ns},
    )
    assert r.rc == 0, r.err
    out = r.lines()
    assert out["name"] == "web-0" and out["host"] == "web-0"
    assert "nameserver 10.96.0.10" in r.out and "10.1.2.3 web-0" in r.out


def test_memory_limit(run: Any) -> None:
    r = run(
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null"
        " || cat /sys/fs/cgroup/memory.max",
        resources=ContainerResources(cgroup=Resources(memory_limit=64 << 20)),
    )
    assert r.rc == 0, r.err
    assert r.out.strip() == str(64 << 20)


def test_device(run: Any) -> None:
    r = run(
        "echo hi > /dev/mynull && echo write=ok; ls -l /dev/mynull",
        devices=(Device("/dev/mynull", "/dev/null", "rw"),),
    )
    assert r.rc == 0, r.err
    assert "write=ok" in r.out and "1,   3" in r.out


def test_privileged(run: Any) -> None:
    extra = next(
        (d["path"] for d in host_devices() if d["path"] in ("/dev/kmsg", "/dev/loop-control")),
        None,
    )
    script = "grep Cap /proc/self/status; grep ' /sys ' /proc/self/mountinfo | head -1;"
    if extra:
        script += f"ls {extra} >/dev/null 2>&1 && echo extra=yes || echo extra=no"
    r = run(script, sec={"privileged": True}, sandbox={"privileged": True})
    assert r.rc == 0, r.err
    caps = status_caps(r)
    # every capability of the kernel that the daemon (this process) holds
    everything = sum(1 << CAPABILITY_NAMES.index(n) for n in host_capabilities())
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapBnd"] == everything
    assert " /sys rw," in r.out
    if extra:
        assert r.lines()["extra"] == "yes"
        r = run(f"ls {extra} >/dev/null 2>&1 && echo extra=yes || echo extra=no")
        assert r.lines()["extra"] == "no"
