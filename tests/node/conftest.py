"""The node lane: tests that run inside the Debian 12 VM of ``tests/vm/run.sh`` (systemd as
PID 1, cgroup v2) against the moorage service ``deploy/install.sh`` installed there, over its
socket, as kubelet would. They reconfigure and restart that service (the node is the
lane's own), so they run only where ``MOORAGE_NODE_LANE`` names the cgroup driver to
configure (``tests/vm/guest.sh`` sets it) and skip everywhere else.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from moorage.cri.v1 import api_pb2 as pb
from moorage.cri.v1 import api_pb2_grpc as pb_grpc
from moorage.sandbox.cgroups import Layout
from tests.e2e.test_containers import Env
from tests.e2e.test_images import insecure_conf
from tests.fixtures.daemon import CriClient
from tests.fixtures.oci import Image, push_image
from tests.fixtures.registry import Registry

DRIVER = os.environ.get("MOORAGE_NODE_LANE", "")
SOCKET = Path("/run/moorage/moorage.sock")
CONF_DIR = Path("/etc/moorage/moorage.d")
LANE_CONF = CONF_DIR / "50-node-lane.toml"
LANE_REGISTRIES = Path("/etc/moorage/node-lane-registries.conf")
CGROUP = Path("/sys/fs/cgroup")
MIB = 1024 * 1024


def run(*cmd: str, check: bool = True) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd}: exit {out.returncode}: {out.stderr.strip()}")
    return out.stdout.strip()


def unit_property(unit: str, name: str) -> str:
    return run("systemctl", "show", "-P", name, unit)


@pytest.fixture(scope="session", autouse=True)
def node_lane() -> str:
    """The cgroup driver of this part of the lane; skips outside the lane's VM."""
    if DRIVER not in ("cgroupfs", "systemd"):
        pytest.skip("node lane only: runs in the VM of tests/vm/run.sh, on its moorage "
                    "service (MOORAGE_NODE_LANE=<cgroup driver>)")
    assert Path("/run/systemd/system").is_dir(), "the node lane needs systemd as PID 1"
    assert Layout.detect().version == 2, "the node lane needs cgroup v2"
    return DRIVER


class Service(CriClient):
    """The node's moorage service (systemd unit ``moorage``) and a client of its socket."""

    def __init__(self) -> None:
        self.channel: grpc.Channel | None = None

    def connect(self, timeout: float = 60) -> None:
        self.close()
        channel = grpc.insecure_channel(f"unix:{SOCKET}")
        grpc.channel_ready_future(channel).result(timeout=timeout)
        self.channel = channel

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def systemctl(self, verb: str) -> None:
        """``systemctl <verb> moorage``; a start returns once the daemon sent READY=1
        (``Type=notify``), so the socket serves at once."""
        self.close()
        run("systemctl", verb, "moorage")
        self.connect(timeout=5)

    def prop(self, name: str) -> str:
        return unit_property("moorage.service", name)

    def configure(self, text: str) -> None:
        """The lane's drop-in config (read at the next start or reload)."""
        LANE_CONF.write_text(text)


@pytest.fixture(scope="session")
def service(node_lane: str, registry: Registry) -> Iterator[Service]:
    """The node's service configured for this part: the cgroup driver, the lane's registry
    (plain HTTP on loopback), crun as a second runtime handler."""
    LANE_REGISTRIES.write_text(insecure_conf(registry))
    svc = Service()
    svc.configure(lane_config(node_lane))
    svc.systemctl("restart")
    try:
        yield svc
    finally:
        if svc.channel is not None:
            for item in svc.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items:
                svc.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=item.id))
        svc.close()


def lane_config(driver: str, extra: str = "") -> str:
    return (f'[runtime]\ncgroup_manager = "{driver}"\n{extra}'
            f'[image]\nregistries_conf = "{LANE_REGISTRIES}"\n'
            '[runtimes.crun]\nruntime_path = "/usr/bin/crun"\n')


@pytest.fixture(scope="session")
def busybox_ref(service: Service, registry: Registry) -> str:
    push_image(registry, "node/busybox", "1", Image.busybox(labels={"lane": "node"}))
    ref = registry.ref("node/busybox", "1")
    service.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=300)
    return ref


class Node(Env):
    """test_containers' Env on the node's service, with pods placed as kubelet places them."""

    def __init__(self, svc: Service, tmp: Path, image: str, driver: str) -> None:
        self.svc = svc
        super().__init__(svc, tmp, image)  # type: ignore[arg-type]
        self.driver = driver

    @property  # type: ignore[override]
    def rt(self) -> pb_grpc.RuntimeServiceStub:
        """The service's client: a restart of the service makes a new channel."""
        return self.svc.runtime

    @rt.setter
    def rt(self, _stub: object) -> None:
        pass  # Env sets it once; ours follows the service

    def kube_pod(self, name: str = "", qos: str = "burstable", uid: str = "",
                 **kw: object) -> tuple[str, str]:
        """A pod in kubelet's pod cgroup for ``qos``: (its id, its cgroup parent)."""
        uid = uid or str(uuid.uuid4())
        parent = kube_parent(self.driver, qos, uid)
        return self.pod(name, uid=uid, cgroup_parent=parent, **kw), parent  # type: ignore[arg-type]

    def info(self, cid: str) -> dict[str, object]:
        return json.loads(self.status(cid, verbose=True).info["info"])  # type: ignore[no-any-return]

    def pid(self, cid: str) -> int:
        return int(self.info(cid)["pid"])  # type: ignore[call-overload]


def kube_parent(driver: str, qos: str, uid: str) -> str:
    """``linux.cgroup_parent`` as kubelet sends it for a pod of ``qos`` with ``uid``."""
    if driver == "systemd":
        # kubelet's systemd names: "-" in the uid becomes "_" (a "-" nests slices).
        levels = ["kubepods", *([qos] if qos != "guaranteed" else []),
                  f"pod{uid.replace('-', '_')}"]
        return "-".join(levels) + ".slice"
    return "/kubepods/" + (f"{qos}/" if qos != "guaranteed" else "") + f"pod{uid}"


def cgroup_of(pid: int) -> str:
    """The v2 cgroup path of a process (``0::<path>``)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(f"process {pid} has no cgroup v2 line")


def read(cgroup: str, name: str) -> str:
    return (CGROUP / cgroup.lstrip("/") / name).read_text().strip()


def wait_for(what: str, check: object, timeout: float = 60) -> None:
    """Poll ``check()`` until it is true."""
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def node(service: Service, busybox_ref: str, tmp_path: Path, node_lane: str
         ) -> Iterator[Node]:
    env = Node(service, tmp_path, busybox_ref, node_lane)
    try:
        yield env
    finally:
        if service.channel is None:
            service.connect()
        for item in service.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items:
            service.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=item.id),
                                             timeout=120)
