"""The systemd unit deploy/install.sh installed: Type=notify readiness, watchdog pings,
reload applying a config change, restarts with containers running (they keep running,
with their exact states), and exits that happened while the daemon was stopped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from moorage.cri.v1 import api_pb2 as pb
from tests.node.conftest import CONF_DIR, Node, Service, run, wait_for

UNIT_DROPIN = Path("/etc/systemd/system/moorage.service.d/50-node-lane.conf")


def handlers(service: Service) -> set[str]:
    return {h.name for h in service.runtime.Status(pb.StatusRequest()).runtime_handlers}


def test_ready_only_once_serving(service: Service) -> None:
    assert service.prop("Type") == "notify"
    assert (service.prop("ActiveState"), service.prop("SubState")) == ("active", "running")
    before = service.prop("MainPID")
    # systemctl returns from a (re)start once the daemon sent READY=1: the socket serves at
    # once (Service.systemctl connects with a short deadline).
    service.systemctl("restart")
    assert service.prop("MainPID") != before
    assert service.runtime.Version(pb.VersionRequest()).runtime_name == "moorage"


@pytest.fixture
def short_watchdog(service: Service) -> Iterator[None]:
    UNIT_DROPIN.parent.mkdir(exist_ok=True)
    UNIT_DROPIN.write_text("[Service]\nWatchdogSec=3s\n")
    run("systemctl", "daemon-reload")
    service.systemctl("restart")
    try:
        yield
    finally:
        UNIT_DROPIN.unlink()
        run("systemctl", "daemon-reload")
        service.systemctl("restart")


def test_watchdog_pings(service: Service, short_watchdog: None) -> None:
    """With WatchdogSec=3s systemd kills a silent daemon after 3 s; moorage pings every
    1.5 s, so across many periods the same process stays and each ping is recorded."""
    assert service.prop("WatchdogUSec") == "3s"
    pid = service.prop("MainPID")
    seen: set[str] = set()

    def pinged() -> bool:
        seen.add(service.prop("WatchdogTimestampMonotonic"))
        return len(seen) >= 6  # about 9 s: three watchdog periods

    wait_for("six watchdog pings", pinged, timeout=60)
    assert service.prop("MainPID") == pid and service.prop("NRestarts") == "0"
    assert service.prop("ActiveState") == "active"


def test_reload_applies_a_config_change(service: Service, node_lane: str) -> None:
    extra = CONF_DIR / "60-node-lane-reload.toml"
    pid = service.prop("MainPID")
    assert "crun-again" not in handlers(service)
    extra.write_text('[runtimes.crun-again]\nruntime_path = "/usr/bin/crun"\n')
    try:
        run("systemctl", "reload", "moorage")
        wait_for("the new handler", lambda: "crun-again" in handlers(service))
        assert service.prop("MainPID") == pid  # the same daemon: reloaded, not restarted
    finally:
        extra.unlink()
        run("systemctl", "reload", "moorage")
        wait_for("the handler to go", lambda: "crun-again" not in handlers(service))
    assert service.prop("MainPID") == pid


WAIT_FOR_FILE = ["sh", "-c", "while [ ! -e /tmp/go ]; do sleep 0.2; done; exit 7"]


def test_restart_keeps_containers_and_learns_exits_while_stopped(node: Node,
                                                                 service: Service) -> None:
    pod, _ = node.kube_pod("survivor")
    running = node.run(pod, "running", ["sleep", "100000"])
    quitter = node.run(pod, "quitter", WAIT_FOR_FILE)
    done = node.run(pod, "done", ["sh", "-c", "exit 3"])
    created = node.create(pod, node.config("created", ["true"]))
    node.wait_state(done, pb.CONTAINER_EXITED)
    before = {c: node.status(c).status for c in (running, quitter, done, created)}
    pids = {c: node.pid(c) for c in (running, quitter)}

    service.systemctl("restart")
    for cid, old in before.items():
        st = node.status(cid).status
        assert (st.state, st.exit_code, st.started_at, st.finished_at) == (
            old.state, old.exit_code, old.started_at, old.finished_at), cid
    assert {c: node.pid(c) for c in (running, quitter)} == pids

    # Stopped: the containers keep running; one of them exits meanwhile.
    service.close()
    run("systemctl", "stop", "moorage")
    assert service.prop("ActiveState") == "inactive"
    for pid in pids.values():
        assert Path(f"/proc/{pid}").exists()
    Path(f"/proc/{pids[quitter]}/root/tmp/go").write_text("")
    wait_for("the quitter to exit", lambda: not Path(f"/proc/{pids[quitter]}").exists())
    service.systemctl("start")
    st = node.status(quitter).status
    assert (st.state, st.exit_code, st.reason) == (pb.CONTAINER_EXITED, 7, "Error")
    assert st.finished_at > before[quitter].started_at
    st = node.status(running).status
    assert st.state == pb.CONTAINER_RUNNING and node.pid(running) == pids[running]
    assert node.status(created).status.state == pb.CONTAINER_CREATED
    assert node.exec(running, ["echo", "alive"]).stdout == b"alive\n"
    # And the recovered ones still stop and go as usual.
    node.rt.StopContainer(pb.StopContainerRequest(container_id=running, timeout=5))
    # (in the pod's shared PID namespace sleep is no init: SIGTERM ends it)
    assert node.wait_state(running, pb.CONTAINER_EXITED).exit_code == 143

