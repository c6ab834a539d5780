"""The fuzz suite's daemon and the world each RPC is fuzzed against, with leak checks.

One daemon serves the whole module (starting one per RPC would eat the time budget). It runs
from its CLI inside a network namespace the fixture creates, with the e2e tests' CNI bridge
config; a real registry (Debian's docker-registry) runs inside the same namespace, so pulls of
fuzzed references go deep and all traffic stays in the namespace. The daemon's working
directory is a deep scratch directory, so relative host paths in fuzzed requests resolve
inside the test's temporary directory.

Each RPC's test gets a fresh :class:`~tests.fuzz.strategies.World` (a ready pod with a
running and a created container); afterwards everything is removed through the CRI and
:meth:`FuzzDaemon.leaks` must find nothing left: no pods or containers, mounts, pinned
namespaces, state files, cgroups, processes, or daemon fds beyond a small bound.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from moorage.cri.v1 import api_pb2 as pb
from tests.e2e.conftest import bridge_conflist, make_daemon
from tests.e2e.test_images import insecure_conf
from tests.fixtures.daemon import OOM_SCORE_CLAMP, Daemon
from tests.fixtures.netns import NetNS, entered, netns_available
from tests.fixtures.oci import BUSYBOX, Image, push_image
from tests.fixtures.registry import Registry, registry_available
from tests.fuzz import strategies
from tests.fuzz.strategies import World

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: The CRI's own default cgroup parent of pods that name none (sandbox.cgroups).
DEFAULT_PARENT = "moorage"
#: Daemon fds may grow this much over a whole run (grpc and helper connections come and go).
FD_SLACK = 16
#: Deadline of cleanup calls: generous, as several test runs may share the CPU.
CLEANUP_TIMEOUT = 120


def mounts_under(prefix: Path) -> list[str]:
    """Mount points at or below ``prefix`` in this mount namespace (octal escapes decoded)."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == str(prefix) or point.startswith(f"{prefix}/"):
                out.append(point)
    return out


def hierarchies() -> list[Path]:
    """Every cgroup hierarchy mounted under /sys/fs/cgroup (v1 controllers, unified)."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            point = Path(fields[4])
            if fstype in ("cgroup", "cgroup2") and CGROUP_ROOT in (point, *point.parents):
                out.append(point)
    return sorted(set(out))


def process_start(pid: int) -> int | None:
    """The start time of a live process (None if it is gone or a zombie: init reaps those)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data.rsplit(b")", 1)[1].split()
    return None if fields[0] == b"Z" else int(fields[19])


def describe_process(pid: int) -> str:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return "gone"
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    return f"{cmd.strip()[:200]!r} state={fields.get('State')} ppid={fields.get('PPid')}"


def processes_mentioning(text: str) -> dict[int, str]:
    """Live processes whose command line or working directory names ``text``."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if text in cmd or cwd.startswith(text):
            out[int(entry)] = cmd.strip()
    return out


@dataclass
class FuzzDaemon:
    d: Daemon
    base: Path
    scratch: Path
    registry: Registry
    image: str
    image_id: str
    cgroup_parent: str
    baseline_mounts: list[str] = field(default_factory=list)
    baseline_fds: int = 0
    baseline_procs: set[int] = field(default_factory=set)
    #: (pid, start time) of every monitor and infra process seen: all must be gone at the end.
    helpers: set[tuple[int, int | None]] = field(default_factory=set)

    @property
    def pid(self) -> int:
        assert self.d.proc is not None
        return self.d.proc.pid

    def alive(self) -> bool:
        return self.d.proc is not None and self.d.proc.poll() is None

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def own_processes(self) -> dict[int, str]:
        return processes_mentioning(str(self.base))

    # -- the world ----------------------------------------------------------------------

    def world(self) -> World:
        w = World(scratch=self.scratch, image=self.image, image_id=self.image_id,
                  cgroup_parent=self.cgroup_parent)
        rt = self.d.runtime
        w.pod_config = strategies.pod_config(w, w.unique())
        w.pod_id = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=w.pod_config),
                                    timeout=CLEANUP_TIMEOUT).pod_sandbox_id
        for attr, cmd in (("running_id", ["sleep", "100000"]), ("created_id", ["true"])):
            cfg = strategies.container_config(w, w.unique(), cmd)
            cid = rt.CreateContainer(pb.CreateContainerRequest(
                pod_sandbox_id=w.pod_id, config=cfg, sandbox_config=w.pod_config),
                timeout=CLEANUP_TIMEOUT).container_id
            setattr(w, attr, cid)
        rt.StartContainer(pb.StartContainerRequest(container_id=w.running_id),
                          timeout=CLEANUP_TIMEOUT)
        self.note_helpers()
        return w

    def note_helpers(self) -> None:
        """Remember the monitor and infra processes of what exists now."""
        import json

        rt = self.d.runtime
        for c in rt.ListContainers(pb.ListContainersRequest(), timeout=30).containers:
            with contextlib.suppress(grpc.RpcError):
                info = json.loads(rt.ContainerStatus(pb.ContainerStatusRequest(
                    container_id=c.id, verbose=True), timeout=30).info["info"])
                for key in ("monitorPid", "pid"):
                    if info.get(key):
                        self.helpers.add((info[key], process_start(info[key])))
        for sb in rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items:
            with contextlib.suppress(grpc.RpcError):
                info = json.loads(rt.PodSandboxStatus(pb.PodSandboxStatusRequest(
                    pod_sandbox_id=sb.id, verbose=True), timeout=30).info["info"])
                if info.get("pid"):
                    self.helpers.add((info["pid"], process_start(info["pid"])))

    # -- cleanup and leaks --------------------------------------------------------------

    def cleanup(self) -> None:
        """Remove through the CRI everything the fuzz made (pods, containers, images)."""
        rt, im = self.d.runtime, self.d.images
        self.note_helpers()
        for c in rt.ListContainers(pb.ListContainersRequest(), timeout=30).containers:
            rt.StopContainer(pb.StopContainerRequest(container_id=c.id, timeout=0),
                             timeout=CLEANUP_TIMEOUT)
            rt.RemoveContainer(pb.RemoveContainerRequest(container_id=c.id),
                               timeout=CLEANUP_TIMEOUT)
        for sb in rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items:
            rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sb.id),
                              timeout=CLEANUP_TIMEOUT)
            rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sb.id),
                                timeout=CLEANUP_TIMEOUT)
        for image in im.ListImages(pb.ListImagesRequest(), timeout=30).images:
            if image.id != self.image_id:
                im.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image.id)),
                               timeout=CLEANUP_TIMEOUT)
        if self.image and not im.ImageStatus(pb.ImageStatusRequest(
                image=pb.ImageSpec(image=self.image)), timeout=30).HasField("image"):
            # RemoveImage (or a pull of another tag) took the fixture's image: pull it back.
            im.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=self.image)),
                         timeout=CLEANUP_TIMEOUT)

    def leaks(self) -> list[str]:
        """What is left of the fuzz after :meth:`cleanup` (empty when nothing leaked)."""
        rt, im = self.d.runtime, self.d.images
        out: list[str] = []
        if not self.alive():
            return [f"daemon exited {self.d.proc and self.d.proc.returncode}"]
        pods = rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items
        out += [f"pod sandbox {p.id} ({p.metadata.name!r}) listed" for p in pods]
        ctrs = rt.ListContainers(pb.ListContainersRequest(), timeout=30).containers
        out += [f"container {c.id} ({c.metadata.name!r}) listed" for c in ctrs]
        images = [i.id for i in im.ListImages(pb.ListImagesRequest(), timeout=30).images]
        out += [f"image {i} listed" for i in images if i != self.image_id]
        out += [f"mount {m}" for m in mounts_under(self.base) if m not in self.baseline_mounts]
        for sub in ("ns/net", "ns/ipc", "ns/uts", "sandboxes", "containers"):
            d = self.d.runroot / sub
            out += [f"file {p}" for p in sorted(d.iterdir())] if d.is_dir() else []
        for sub in ("sandboxes", "containers"):
            d = self.d.root / sub
            out += [f"file {p}" for p in sorted(d.iterdir())] if d.is_dir() else []
        out += [f"cgroup {c}" for c in self.cgroups()]
        for pid, start in sorted(self.helpers, key=lambda h: h[0]):
            if start is not None and process_start(pid) == start:
                out.append(f"process {pid} (monitor or infra of a removed object) alive: "
                           f"{describe_process(pid)}")
        extra = {p: cmd for p, cmd in self.own_processes().items()
                 if p not in self.baseline_procs}
        out += [f"process {p}: {cmd[:200]}" for p, cmd in sorted(extra.items())]
        fds = self.fds()
        if fds > self.baseline_fds + FD_SLACK:
            out.append(f"daemon fds grew from {self.baseline_fds} to {fds}: "
                       f"{sorted(self.fd_targets())}")
        return out

    def settled_leaks(self, timeout: float = 30.0) -> list[str]:
        """:meth:`leaks`, asked again for a while: monitors exit shortly after their
        container, and kernel cleanups of namespaces and cgroups are asynchronous."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.leaks()
            if not found or time.monotonic() > deadline:
                return found
            time.sleep(0.2)

    def fd_targets(self) -> list[str]:
        out = []
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(OSError):
                out.append(os.readlink(f"/proc/{self.pid}/fd/{fd}"))
        return out

    def cgroups(self) -> list[str]:
        """Cgroups left by this daemon: anything below the fuzz parent, and pod cgroups
        below the default parent that this daemon's log names (other test runs may have
        their own there)."""
        log = self.d.log_path.read_text(errors="replace")
        out = []
        for h in hierarchies():
            mine = h / self.cgroup_parent.lstrip("/")
            if mine.is_dir():
                out += [str(p) for p in mine.iterdir() if p.is_dir()]
            shared = h / DEFAULT_PARENT
            if shared.is_dir():
                out += [str(p) for p in shared.iterdir() if p.is_dir() and p.name in log]
        return out


def _remove_cgroups(parent: str) -> None:
    """Remove the fuzz parent cgroup (and anything a failed run left in it), deepest first."""
    for h in hierarchies():
        top = h / parent.lstrip("/")
        if not top.is_dir():
            continue
        for dirpath, _, _ in sorted(os.walk(top), key=lambda e: -len(e[0])):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def _kill_processes_under(base: Path) -> None:
    for pid in processes_mentioning(str(base)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzDaemon]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not registry_available():
        pytest.skip("Debian's docker-registry is missing")
    if not netns_available():
        pytest.skip("network namespaces are not available")
    if not BUSYBOX.exists():
        pytest.skip(f"{BUSYBOX} is missing (Debian package busybox-static)")
    base = tmp_path_factory.mktemp("fuzz")
    scratch = base / "scratch"
    (scratch / "data").mkdir(parents=True)
    (scratch / "file").write_text("a file\n")
    (scratch / "link").symlink_to(scratch / "data")
    cwd = base / "cwd" / "a" / "b" / "c" / "d" / "e" / "f" / "g" / "h"
    cwd.mkdir(parents=True)
    cni_dir = base / "net.d"
    cni_dir.mkdir()
    import json

    (cni_dir / "10-bridge.conflist").write_text(json.dumps(bridge_conflist(base)))
    cgroup_parent = f"/moorage-fuzz-{secrets.token_hex(4)}"
    ns = NetNS.create("mfz")
    registry = Registry(workdir=base / "registry")
    d = make_daemon(base, ns.path, cni_dir)
    here = os.getcwd()
    try:
        with entered(ns.path):
            registry.start()
            push_image(registry, "fuzz/busybox", "1", Image.busybox(labels={"suite": "fuzz"}))
        d.registries_conf_text = insecure_conf(registry)
        d.config_text = OOM_SCORE_CLAMP
        os.chdir(cwd)
        try:
            d.start()
        finally:
            os.chdir(here)
        image = registry.ref("fuzz/busybox", "1")
        image_id = d.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)),
                                      timeout=CLEANUP_TIMEOUT).image_ref
        f = FuzzDaemon(d=d, base=base, scratch=scratch, registry=registry, image=image,
                       image_id=image_id, cgroup_parent=cgroup_parent)
        # Warm up (the monitor's fork server, CNI, grpc threads) before taking baselines.
        f.world()
        f.cleanup()
        time.sleep(0.5)
        f.baseline_mounts = mounts_under(base)
        f.baseline_fds = f.fds()
        f.baseline_procs = set(f.own_processes())
        leaks = f.settled_leaks()
        assert not leaks, leaks
        yield f
    finally:
        with contextlib.suppress(Exception):
            if d.channel is not None:
                FuzzDaemon(d=d, base=base, scratch=scratch, registry=registry, image="",
                           image_id="", cgroup_parent=cgroup_parent).cleanup()
        d.stop()
        _kill_processes_under(base)
        registry.stop()
        ns.delete()
        _remove_cgroups(cgroup_parent)
