"""The requests a real kubelet 1.35 sent to moorage (``tests/data/kubelet-requests``),
replayed over the socket on this host as it is.

Per pod, in the recorded order: RunPodSandbox, then each CreateContainer (restarts
included) with the returned sandbox id substituted, then StartContainer. The requests are
kept as kubelet sent them (hugepage limits of every page size, swap = memory limit,
kubelet's masked and read-only paths, restricted security contexts...), with only what
must point elsewhere on a test machine rewritten:

- the pod UID, fresh per run (it names the pod cgroup), and the cgroup parents under a
  cgroup root of the test's own (kubelet's ``cgroupRoot``), or, for the systemd driver,
  the slices kubelet sends there (``kubepods-<qos>-pod<uid>.slice``);
- the host paths under ``/var/lib/kubelet/pods/<uid>/`` and the hostPath volume: private
  directories of the test, made as kubelet makes them before CreateContainer (etc-hosts,
  the termination-log file, volume directories with the files the commands read);
- ``log_directory``: the test's own;
- the image id: the id of the stand-in the daemon pulled under the recorded name
  (busybox for busybox, busybox ``httpd`` for nginx), from the test registry, which
  registries.conf puts in place of ``registry.k8s.io``.

Then each pod's containers are checked for what they do (serve HTTP, log what their command
prints, run as the restricted user, exit 3 at every restart...), the hooks' ExecSync runs,
and stopping and removing everything as kubelet did leaves nothing on the node.

``MOORAGE_TEST_CGROUP_DRIVER`` (``cgroupfs``, ``systemd``, or both comma-separated, the
default) selects the daemon's cgroup drivers; systemd needs systemd as init.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from moorage.cri.v1 import api_pb2 as pb
from moorage.cri.v1 import api_pb2_grpc as pb_grpc
from moorage.sandbox import cgroups
from tests.e2e.conftest import in_ns, make_daemon
from tests.e2e.test_crash_consistency import assert_nothing_left
from tests.e2e.test_sandboxes import netns_of
from tests.fixtures.daemon import Daemon
from tests.fixtures.oci import Image, Layer, busybox_layer, push_image
from tests.fixtures.registry import Registry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

DATA = Path(__file__).parent.parent / "data" / "kubelet-requests"
DRIVERS = [d for d in os.environ.get("MOORAGE_TEST_CGROUP_DRIVER", "cgroupfs,systemd")
           .split(",") if d]
BUSYBOX = "registry.k8s.io/e2e-test-images/busybox:1.29-2"
NGINX = "registry.k8s.io/e2e-test-images/nginx:1.14-2"
INDEX = "moorage's nginx stand-in\n"
#: Containers that run to completion, and their exit code; every other one keeps running.
EXITS = {("default_crasher", "crasher"): 3, ("default_sp-crash", "crasher"): 3,
         ("default_onejob-pcd8m", "work"): 0}
RUNNING, EXITED = pb.CONTAINER_RUNNING, pb.CONTAINER_EXITED


# -- the recorded requests, rewritten for this machine ------------------------------------------


def kubelet_slice(parent: str) -> str:
    """The slice kubelet's systemd driver sends for its cgroupfs parent: ``/kubepods/
    burstable/pod<uid>`` -> ``kubepods-burstable-pod<uid>.slice`` (``-`` of the UID as
    ``_``); ``/kubepods/pod<uid>`` (Guaranteed) -> ``kubepods-pod<uid>.slice``."""
    return "-".join(part.replace("-", "_") for part in parent.strip("/").split("/")) + ".slice"


@dataclass
class Replay:
    """One recorded pod, rewritten: ``key`` is its file's stem."""

    key: str
    run: pb.RunPodSandboxRequest
    creates: list[pb.CreateContainerRequest]
    host_dir: Path
    sandbox_id: str = ""
    #: container name -> ids of its attempts, in order
    ids: dict[str, list[str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.run.config.metadata.name)

    def last(self, container: str) -> str:
        return self.ids[container][-1]


def _prepare_mount(mount: dict[str, Any], command: list[str], top: Path) -> None:
    """What kubelet makes before CreateContainer: the mount's source under ``top``, a file
    for /etc/hosts and the termination log, else a directory holding the files the
    container's command reads below the mount."""
    source = top / mount["host_path"].lstrip("/")
    mount["host_path"] = str(source)
    target = mount["container_path"]
    source.parent.mkdir(parents=True, exist_ok=True)
    if target == "/etc/hosts":
        source.write_text("127.0.0.1\tlocalhost\n::1\tlocalhost\n")
        return
    if target == "/dev/termination-log":
        source.touch()
        return
    source.mkdir(exist_ok=True)
    for word in " ".join(command).split():
        if word.startswith(target.rstrip("/") + "/"):
            inside = source / word[len(target.rstrip("/")) + 1:]
            inside.write_text(f"replay:{word}\n")


def load(path: Path, tmp: Path, driver: str, cgroup_root: str, images: dict[str, str]
         ) -> Replay:
    text = path.read_text()
    recorded_uid = json.loads(text)["uid"]
    doc = json.loads(text.replace(recorded_uid, str(uuid.uuid4())))
    top = tmp / "host"
    config = doc["run_pod_sandbox"]["config"]
    config["log_directory"] = str(tmp / "logs" / Path(config["log_directory"]).name)
    parent = config["linux"]["cgroup_parent"]
    config["linux"]["cgroup_parent"] = (kubelet_slice(parent) if driver == "systemd"
                                        else f"/{cgroup_root}{parent}")
    run = json_format.ParseDict(doc["run_pod_sandbox"], pb.RunPodSandboxRequest())
    creates = []
    for entry in doc["containers"]:
        cfg = entry["create_container"]["config"]
        cfg["image"]["image"] = images[cfg["image"]["user_specified_image"]]
        for mount in cfg.get("mounts", []):
            _prepare_mount(mount, cfg.get("command", []) + cfg.get("args", []), top)
        req = json_format.ParseDict(entry["create_container"], pb.CreateContainerRequest())
        req.sandbox_config.CopyFrom(run.config)
        creates.append(req)
    return Replay(path.stem, run, creates, top)


# -- the daemon, the images, the QoS cgroups kubelet keeps ---------------------------------------


@pytest.fixture(scope="module")
def stand_ins(registry: Registry) -> Registry:
    """busybox and an nginx stand-in (busybox ``httpd`` on port 80), in the test registry
    under the recorded repositories."""
    push_image(registry, "e2e-test-images/busybox", "1.29-2", Image.busybox())
    html = (Layer().add_dir("usr").add_dir("usr/share").add_dir("usr/share/nginx")
            .add_dir("usr/share/nginx/html")
            .add_file("usr/share/nginx/html/index.html", INDEX).build("gzip"))
    nginx = Image(layers=[busybox_layer("gzip"), html], cmd=None, stop_signal="SIGQUIT",
                  entrypoint=["/bin/busybox", "httpd", "-f", "-p", "80", "-h",
                              "/usr/share/nginx/html"], exposed_ports=["80/tcp"])
    push_image(registry, "e2e-test-images/nginx", "1.14-2", nginx)
    return registry


@contextlib.contextmanager
def replay_daemon(tmp: Path, node_ns: str, cni_dir: Path, registry: Registry,
                  driver: str) -> Iterator[tuple[Daemon, dict[str, str]]]:
    """The daemon with the stand-ins pulled under their recorded names (outside the node
    namespace, where the registry is), then running in the node namespace."""
    d = make_daemon(tmp, node_ns, cni_dir, ["--cgroup-manager", driver])
    d.registries_conf_text = (f'[[registry]]\nprefix = "registry.k8s.io"\n'
                              f'location = "{registry.host}"\ninsecure = true\n')
    node, d.netns = d.netns, None
    d.start()
    try:
        images = {ref: d.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)),
                                          timeout=120).image_ref for ref in (BUSYBOX, NGINX)}
    finally:
        d.stop()
    d.netns = node
    d.start()
    try:
        yield d, images
    finally:
        d.remove_pods_and_stop()


@contextlib.contextmanager
def qos_cgroups(driver: str, cgroup_root: str) -> Iterator[cgroups.Layout]:
    """The QoS-level cgroups kubelet makes at its start (pods go below them); at the end
    they must come out empty: a pod cgroup left inside fails the rmdir."""
    layout = cgroups.Layout.detect()
    if driver == "systemd":
        paths = [cgroups.pod_cgroup_path(s, "systemd") for s in
                 ("kubepods-besteffort.slice", "kubepods-burstable.slice")]
    else:
        paths = [f"/{cgroup_root}/kubepods/besteffort", f"/{cgroup_root}/kubepods/burstable"]
    made: list[Path] = []
    for path in paths:
        made += cgroups.PodCgroup(layout, path).create()
    yield layout
    cgroups.PodCgroup(layout, paths[0]).remove(made)  # FailedPrecondition names what is left


# -- the replay -----------------------------------------------------------------------------


def wait_state(rt: pb_grpc.RuntimeServiceStub, cid: str, state: int, timeout: float = 60
               ) -> pb.ContainerStatus:
    deadline = time.monotonic() + timeout
    while True:
        st = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status
        if st.state == state or time.monotonic() > deadline:
            return st
        time.sleep(0.1)


def replay(rt: pb_grpc.RuntimeServiceStub, pod: Replay) -> None:
    """RunPodSandbox, then the recorded CreateContainers, each started. Before a restart
    the previous attempt has exited (a container that runs to completion) or is stopped as
    kubelet stopped it (one that was killed: the hooks pod's restarts)."""
    pod.sandbox_id = rt.RunPodSandbox(pod.run, timeout=120).pod_sandbox_id
    for req in pod.creates:
        name = req.config.metadata.name
        if name in pod.ids:
            previous = pod.ids[name][-1]
            if (pod.key, name) in EXITS:
                st = wait_state(rt, previous, EXITED)
                assert (st.state, st.exit_code) == (EXITED, EXITS[pod.key, name]), st
            else:
                assert wait_state(rt, previous, RUNNING).state == RUNNING
                rt.StopContainer(pb.StopContainerRequest(container_id=previous, timeout=10))
                st = wait_state(rt, previous, EXITED)
                assert (st.state, st.exit_code) == (EXITED, 0), st  # trap 'exit 0' TERM
        req.pod_sandbox_id = pod.sandbox_id
        cid = rt.CreateContainer(req, timeout=120).container_id
        rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
        pod.ids.setdefault(name, []).append(cid)


def logs(rt: pb_grpc.RuntimeServiceStub, cid: str) -> str:
    path = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status.log_path
    return Path(path).read_text(errors="replace")


def wait_log(rt: pb_grpc.RuntimeServiceStub, cid: str, *wanted: str, timeout: float = 60
             ) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = logs(rt, cid)
        if all(w in text for w in wanted) or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


def exec_sync(rt: pb_grpc.RuntimeServiceStub, cid: str, *cmd: str, timeout: int = 30
              ) -> tuple[int, str]:
    r = rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=timeout),
                    timeout=120)
    return r.exit_code, (r.stdout + r.stderr).decode(errors="replace")


def http_get(d: Daemon, pod: Replay) -> str:
    """GET / on port 80 from inside the pod's network namespace."""
    client = ("import urllib.request;print(urllib.request.urlopen("
              "'http://127.0.0.1:80/', timeout=5).read().decode(), end='')")
    netns = netns_of(d, pod.sandbox_id)
    deadline = time.monotonic() + 30
    while True:
        try:
            return in_ns(netns, "python3", "-c", client)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def check_pod(d: Daemon, pod: Replay, layout: cgroups.Layout) -> None:
    """What each recorded pod's containers do, and that every container runs (or ran to
    its recorded end)."""
    rt = d.runtime
    for name, ids in pod.ids.items():
        expected = EXITS.get((pod.key, name))
        for cid in ids[:-1] if expected is None else ids:
            st = wait_state(rt, cid, EXITED)
            assert st.state == EXITED, (pod.key, name, st)
            if expected is not None:
                assert st.exit_code == expected and st.reason == (
                    "Completed" if expected == 0 else "Error"), (pod.key, name, st)
        if expected is None:
            assert wait_state(rt, ids[-1], RUNNING).state == RUNNING, (pod.key, name)
        # The recorded hugepage limits reach runc where the node has hugetlb for the pod,
        # and only there (this host: none).
        status = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=ids[-1],
                                                              verbose=True))
        spec = json.loads(status.info["info"])["runtimeSpec"]
        sent = {h.page_size for h in pod.creates[0].config.linux.resources.hugepage_limits}
        usable = ("hugetlb" in layout.controllers(cgroups.pod_cgroup_path(
            pod.run.config.linux.cgroup_parent, d_driver(d))))
        got = {h["pageSize"] for h in spec["linux"]["resources"].get("hugepageLimits", [])}
        assert got == (sent & layout.hugepage_sizes if usable else set()), (pod.key, got)

    key = pod.key
    if key.startswith("default_web-") or key == "default_sp-nginx":
        assert http_get(d, pod) == INDEX
    elif key == "default_onejob-pcd8m":
        assert logs(rt, pod.last("work")).count("job-") == 2
    elif key == "default_shared-vol":
        assert "tick " in wait_log(rt, pod.last("consumer"), "tick ")  # the shared emptyDir
    elif key == "default_cfgpod":
        text = wait_log(rt, pod.last("main"), "replay:/etc/sec/password")
        assert "GREETING=hello-from-configmap PASSWORD=s3cr3t-value" in text
        assert "replay:/etc/cfg/app.conf" in text
    elif key == "default_restricted":
        text = wait_log(rt, pod.last("main"), "Seccomp:")
        assert "uid=1000(app) gid=3000 groups=2000,3000" in text, text
        assert "CapEff:\t0000000000000000" in text
        assert "Read-only file system" in text
        assert "Seccomp:\t2" in text
    elif key == "default_hooks":
        # kubelet's postStart hook: ExecSync with no timeout, writing into the hostPath
        code, out = exec_sync(rt, pod.last("main"), "sh", "-c",
                              "echo poststart $(date +%s) > /hv/poststart; "
                              "echo poststart > /tmp/poststart", timeout=0)
        assert code == 0, out
        assert (pod.host_dir / "var/lib/kube-trial-hooks/poststart").read_text().startswith(
            "poststart ")
    elif key == "default_attachee":
        assert "attach-line 0" in wait_log(rt, pod.last("main"), "attach-line 0")
    elif key == "default_sp-busybox":
        assert exec_sync(rt, pod.last("writer1"), "sh", "-c", "test -f /tmp/healthy",
                         timeout=1)[0] == 0  # the recorded liveness probe
        assert "writer2 stderr" in wait_log(rt, pod.last("writer2"), "writer2 stderr")
    elif key == "default_sp-resources":
        code, out = exec_sync(rt, pod.last("limited"), "sh", "-c",
                              "cat /sys/fs/cgroup/memory.max 2>/dev/null || "
                              "cat /sys/fs/cgroup/memory/memory.limit_in_bytes")
        assert (code, out.strip()) == (0, str(64 << 20))


def d_driver(d: Daemon) -> cgroups.Driver:
    return "systemd" if "systemd" in d.extra_args else "cgroupfs"


def teardown(rt: pb_grpc.RuntimeServiceStub, pod: Replay) -> None:
    """As kubelet ended them: the containers stopped at once with the grace kubelet gave
    (30 s: most of them ignore SIGTERM as PID 1), the sandbox stopped, the containers
    removed, the sandbox removed."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for job in [pool.submit(rt.StopContainer, pb.StopContainerRequest(
                container_id=cid, timeout=30), timeout=120)
                for ids in pod.ids.values() for cid in ids]:
            job.result()
    rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod.sandbox_id))
    for ids in pod.ids.values():
        for cid in ids:
            rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod.sandbox_id))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("driver", DRIVERS)
def test_replay_kubelet_requests(tmp_path: Path, node_ns: str, cni_dir: Path,
                                 stand_ins: Registry, driver: str) -> None:
    if driver == "systemd" and not Path("/run/systemd/system").is_dir():
        pytest.skip("the systemd cgroup driver needs systemd as init")
    cgroup_root = f"moorage-replay-{secrets.token_hex(4)}"
    with replay_daemon(tmp_path, node_ns, cni_dir, stand_ins, driver) as (d, images), \
            qos_cgroups(driver, cgroup_root) as layout:
        pods = [load(p, tmp_path, driver, cgroup_root, images)
                for p in sorted((DATA / "pods").glob("*.json"))]
        assert len(pods) == 15
        rt = d.runtime
        for pod in pods:
            replay(rt, pod)
        for pod in pods:
            check_pod(d, pod, layout)
        with concurrent.futures.ThreadPoolExecutor(len(pods)) as pool:
            for job in [pool.submit(teardown, rt, pod) for pod in pods]:
                job.result()
        assert not rt.ListContainers(pb.ListContainersRequest()).containers
        assert not rt.ListPodSandbox(pb.ListPodSandboxRequest()).items
        assert_nothing_left(d, node_ns, tmp_path)
        for pod in pods:
            path = cgroups.pod_cgroup_path(pod.run.config.linux.cgroup_parent, driver)
            assert not any(p.exists() for p in cgroups.PodCgroup(layout, path).dirs()), path
