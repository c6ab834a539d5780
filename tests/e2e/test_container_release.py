"""What an exited container keeps: its status and files, not its runtime state or mounts.

As containerd does on a task's exit, the runtime's container (and so its cgroup) is deleted
and the rootfs unmounted as soon as the exit is recorded; StopContainer returns after that,
and RemoveContainer only takes the files away (moved aside, deleted in the background).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from moorage.cri.v1 import api_pb2 as pb
from tests.e2e.test_containers import Env, busybox_ref, env  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _runc_state(e: Env, cid: str) -> Path:
    return e.d.runroot / "runtimes" / "runc" / cid


def _rootfs(e: Env, cid: str) -> Path:
    return e.d.root / "overlay" / "containers" / cid / "merged"


def _mounted(path: Path) -> bool:
    target = str(path)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if line.split(" ")[4] == target:
            return True
    return False


def _wait_for(check: Callable[[], bool], what: str, deadline: float = 30) -> None:
    end = time.monotonic() + deadline
    while not check():
        assert time.monotonic() < end, what
        time.sleep(0.05)


def test_exit_releases_runtime_state_and_rootfs(env: Env) -> None:  # noqa: F811 (fixture)
    pod = env.pod()
    quitter = env.run(pod, "quitter", ["sh", "-c", "echo bye > /left; exit 5"])
    st = env.wait_state(quitter, pb.CONTAINER_EXITED)
    assert (st.state, st.exit_code, st.reason) == (pb.CONTAINER_EXITED, 5, "Error")
    # Released on its own exit, without a Stop or Remove.
    _wait_for(lambda: not _runc_state(env, quitter).exists(), "runc state kept after exit")
    _wait_for(lambda: not _mounted(_rootfs(env, quitter)), "rootfs still mounted after exit")
    # What it wrote stays in its writable layer until RemoveContainer.
    upper = env.d.root / "overlay" / "containers" / quitter / "upper"
    assert (upper / "left").read_text() == "bye\n"
    st = env.status(quitter).status  # still reported, with the truth
    assert (st.state, st.exit_code) == (pb.CONTAINER_EXITED, 5)
    assert st.started_at <= st.finished_at

    # StopContainer returns once the runtime's container is deleted and unmounted.
    runner = env.run(pod, "runner", ["sleep", "1000"])
    env.wait_state(runner, pb.CONTAINER_RUNNING)
    assert _runc_state(env, runner).exists() and _mounted(_rootfs(env, runner))
    env.rt.StopContainer(pb.StopContainerRequest(container_id=runner, timeout=10))
    assert not _runc_state(env, runner).exists()
    assert not _mounted(_rootfs(env, runner))
    assert env.status(runner).status.exit_code == 143

    # RemoveContainer takes the rest; the trash is emptied behind it.
    for cid in (quitter, runner):
        env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
        assert not (env.d.root / "overlay" / "containers" / cid).exists()
        assert not (env.d.runroot / "containers" / cid).exists()
        assert not (env.d.root / "containers" / f"{cid}.json").exists()
    _wait_for(lambda: not any((env.d.root / "overlay" / "trash").iterdir()),
              "overlay trash never emptied")
    _wait_for(lambda: not any((env.d.runroot / "containers-trash").iterdir()),
              "state dir trash never emptied")
    assert not env.rt.ListContainers(pb.ListContainersRequest()).containers


def test_exit_while_daemon_down_is_released_after_restart(env: Env) -> None:  # noqa: F811 (fixture)
    pod = env.pod()
    quitter = env.run(pod, "quitter", ["sh", "-c", "sleep 2; exit 7"])
    env.wait_state(quitter, pb.CONTAINER_RUNNING)
    env.d.kill9()
    time.sleep(3)  # the exit happens while no daemon runs: nobody released the container
    assert _runc_state(env, quitter).exists() and _mounted(_rootfs(env, quitter))
    # A removal interrupted after its renames: the trash is emptied by the next start.
    stale = env.d.root / "overlay" / "trash" / ("f" * 64)
    (stale / "upper" / "deep").mkdir(parents=True)
    (stale / "upper" / "deep" / "file").write_text("x")
    before_restart = time.time_ns()
    env.d.start()
    env.rt = env.d.runtime
    st = env.status(quitter).status
    assert (st.state, st.exit_code) == (pb.CONTAINER_EXITED, 7)
    assert st.finished_at < before_restart
    _wait_for(lambda: not _runc_state(env, quitter).exists(), "runc state kept after restart")
    _wait_for(lambda: not _mounted(_rootfs(env, quitter)), "rootfs mounted after restart")
    _wait_for(lambda: not stale.exists(), "trash of the previous daemon kept")
    # The status survives the release and a second restart.
    env.d.stop()
    env.d.start()
    env.rt = env.d.runtime
    st = env.status(quitter).status
    assert (st.state, st.exit_code, st.reason) == (pb.CONTAINER_EXITED, 7, "Error")
    env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=quitter))
    assert not env.rt.ListContainers(pb.ListContainersRequest()).containers


def test_pod_removal_releases_running_containers(env: Env) -> None:  # noqa: F811 (fixture)
    """RemovePodSandbox stops (and so releases) a running container, then removes it."""
    pod = env.pod()
    cid = env.run(pod, "sleeper", ["sleep", "1000"])
    env.wait_state(cid, pb.CONTAINER_RUNNING)
    env.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod))
    assert not _runc_state(env, cid).exists()
    assert not _mounted(_rootfs(env, cid))
    assert not env.rt.ListContainers(pb.ListContainersRequest()).containers


def test_start_of_a_process_that_exits_at_once(env: Env) -> None:  # noqa: F811 (fixture)
    """The exit can be recorded (and the release begin) before ``runc start`` returns; the
    release waits for it, so the start never fails on state deleted under it."""
    pod = env.pod()
    for i in range(12):
        cid = env.run(pod, f"quick{i}", ["true"])  # a failed StartContainer raises here
        st = env.wait_state(cid, pb.CONTAINER_EXITED)
        assert (st.state, st.exit_code, st.reason) == (pb.CONTAINER_EXITED, 0, "Completed")
        assert st.started_at <= st.finished_at
        _wait_for(lambda cid=cid: not _runc_state(env, cid).exists(),  # type: ignore[misc]
                  "runc state kept after exit")
