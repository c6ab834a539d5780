"""A container's monitor killed with SIGKILL, and a real reboot.

The monitor is what learns a container's exit. When it dies (SIGKILL, the OOM killer) the
container would go on unwatched, its exit never known: as CRI-O does when conmon dies
(its "conmonmon"), moorage kills the container and reports it exited, with a message
saying why, instead of keeping it running unobserved. A reboot loses /run (the runroot,
with the runtime's state and the monitors' sockets), every process and every mount: every
container is then reported exited, never running, and can be removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from bench.cribench.node import unmount_under
from moorage.cri.v1 import api_pb2 as pb
from tests.e2e.test_containers import Env
from tests.e2e.test_crash_consistency import assert_nothing_left, remove_everything
from tests.fixtures.daemon import kill_monitor_servers
from tests.fixtures.procs import alive

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _info(env: Env, cid: str) -> dict[str, int]:
    return dict(json.loads(env.status(cid, verbose=True).info["info"]))


def _wait(check: object, what: str, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < end, what
        time.sleep(0.05)


def test_monitor_killed_means_container_killed_and_exited(env: Env, node_ns: str,
                                                          tmp_path: Path) -> None:
    pod = env.pod()
    cid = env.run(pod, "app", ["sleep", "1000"])
    other = env.run(pod, "other", ["sleep", "1000"])
    env.wait_state(cid, pb.CONTAINER_RUNNING)
    info = _info(env, cid)
    pid, monitor = info["pid"], info["monitorPid"]
    assert alive(pid) and alive(monitor)
    os.kill(monitor, signal.SIGKILL)
    st = env.wait_state(cid, pb.CONTAINER_EXITED)
    assert st.state == pb.CONTAINER_EXITED
    assert st.reason == "Error" and "monitor" in st.message, st.message
    assert st.finished_at >= st.started_at
    # Not left running unwatched: the container's processes are gone.
    _wait(lambda: not alive(pid), "the container outlived its monitor")
    # The pod's other container is untouched.
    assert env.status(other).status.state == pb.CONTAINER_RUNNING
    assert env.exec(other, ["true"]).exit_code == 0
    # The same after a restart of the daemon: still exited, with the same words.
    env.d.stop()
    env.d.start()
    env.rt = env.d.runtime
    again = env.status(cid).status
    assert (again.state, again.exit_code, again.message) == (
        pb.CONTAINER_EXITED, st.exit_code, st.message)
    remove_everything(env.rt)
    assert_nothing_left(env.d, node_ns, tmp_path)


def test_reboot_reports_every_container_exited_and_removable(env: Env, node_ns: str,
                                                              tmp_path: Path) -> None:
    pods = [env.pod(f"rb{i}") for i in range(2)]
    running = [env.run(p, f"app{i}", ["sleep", "1000"]) for i, p in enumerate(pods)]
    created = env.create(pods[0], env.config("never-started", ["sleep", "1000"]))
    done = env.run(pods[1], "done", ["sh", "-c", "exit 3"])
    env.wait_state(done, pb.CONTAINER_EXITED)
    for cid in running:
        env.wait_state(cid, pb.CONTAINER_RUNNING)
    pids = [_info(env, c)["pid"] for c in (*running, created)]
    d = env.d
    d.stop()
    # The reboot: every process of the node's containers goes (their cgroups' members,
    # the monitors, the monitor server), every mount goes, and the runroot (/run) is
    # empty again.
    _kill_cgroup_members(pids)
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cwd = os.readlink(p / "cwd")
            except OSError:
                continue
            if cwd.startswith(str(d.runroot) + "/"):
                os.kill(int(p.name), signal.SIGKILL)
    kill_monitor_servers({str(d.runroot)})
    _wait(lambda: not any(alive(p) for p in pids), "container processes survived")
    unmount_under(d.runroot)
    unmount_under(d.root)
    subprocess.run(["rm", "-rf", "--one-file-system", str(d.runroot)], check=True)
    d.start()
    env.rt = d.runtime
    for cid in (*running, created, done):
        st = env.status(cid).status
        assert st.state == pb.CONTAINER_EXITED, (cid, st.state)
    flt = pb.ContainerFilter(state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING))
    assert not env.rt.ListContainers(pb.ListContainersRequest(filter=flt)).containers
    assert env.status(done).status.exit_code == 3
    assert "monitor" in env.status(running[0]).status.message
    for pod in pods:
        assert env.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(
            pod_sandbox_id=pod)).status.state == pb.SANDBOX_NOTREADY
    # Everything can be removed, and then nothing is left.
    for cid in (*running, created, done):
        env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    remove_everything(env.rt)
    assert_nothing_left(d, node_ns, tmp_path)


def _kill_cgroup_members(pids: list[int]) -> None:
    """SIGKILL the containers' processes and whatever else shares their cgroups (what a
    power cut does). Their cgroups stay: the daemon must cope with leftovers as well."""
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            _, controllers, path = line.split(":", 2)
            hierarchy = controllers.removeprefix("name=") or "unified"
            for top in (Path("/sys/fs/cgroup") / hierarchy, Path("/sys/fs/cgroup")):
                procs = top / path.lstrip("/") / "cgroup.procs"
                if procs.is_file():
                    for member in procs.read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(member), signal.SIGKILL)
                    break
