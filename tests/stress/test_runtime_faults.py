"""The OCI runtime failing: a runc wrapper (a runtime handler of its own) that fails or
hangs on ``create``, ``start``, ``kill``, ``delete`` or ``exec`` when the test says so.
Each call gets a clear error (the runtime's words, or DEADLINE_EXCEEDED once the handler's
command timeout passed), the container is reported as it really is, the same call succeeds
once the runtime works again, and nothing is left behind."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from moorage.cri.v1 import api_pb2 as pb
from tests.e2e.test_containers import Env, rpc_error, running_env
from tests.e2e.test_crash_consistency import assert_nothing_left, remove_everything
from tests.fixtures.faults import hung_commands, runtime_wrapper, set_rules
from tests.fixtures.registry import Registry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

COMMAND_TIMEOUT = 3
CREATE_TIMEOUT = 5
HANDLER = "faulty"


class Faulty:
    def __init__(self, env: Env, rules: Path, node_ns: str) -> None:
        self.env = env
        self.rules = rules
        self.node_ns = node_ns

    def pod(self, name: str) -> str:
        return self.env.pod(name, runtime_handler=HANDLER)

    def fail(self, **actions: str) -> None:
        set_rules(self.rules, **actions)

    def each_fault(self, command: str) -> Iterator[tuple[str, grpc.StatusCode]]:
        """``command`` failing, then hanging (and the status code each must give); then
        the runtime works again."""
        for action, want in (("fail", grpc.StatusCode.FAILED_PRECONDITION),
                             ("hang", grpc.StatusCode.DEADLINE_EXCEEDED)):
            self.fail(**{command: action})
            yield action, want
        self.fail()

    def clean(self) -> None:
        self.fail()
        remove_everything(self.env.rt)
        assert_nothing_left(self.env.d, self.node_ns, self.env.tmp,
                            handlers=("runc", HANDLER))
        assert hung_commands(self.rules) == []


@pytest.fixture
def faulty(tmp_path: Path, node_ns: str, cni_dir: Path, registry: Registry,
           busybox_ref: str) -> Iterator[Faulty]:
    rules = tmp_path / "runtime-rules"
    wrapper = runtime_wrapper(tmp_path / "bin", rules)
    handler = (f'[runtimes.{HANDLER}]\nruntime_path = "{wrapper}"\n'
               f"command_timeout = {COMMAND_TIMEOUT}\ncreate_timeout = {CREATE_TIMEOUT}\n")
    with running_env(tmp_path, node_ns, cni_dir, registry, busybox_ref,
                     config_extra=handler) as env:
        yield Faulty(env, rules, node_ns)


def _code(e: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    return e.code(), e.details() or ""


def test_create_fails_or_hangs(faulty: Faulty) -> None:
    env = faulty.env
    pod = faulty.pod("create")
    cfg = env.config("app", ["sleep", "1000"])
    faulty.fail(create="fail")
    code, msg = _code(rpc_error(lambda: env.create(pod, cfg)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "injected create failure" in msg
    assert not env.rt.ListContainers(pb.ListContainersRequest()).containers
    faulty.fail(create="hang")
    t0 = time.monotonic()
    code, msg = _code(rpc_error(lambda: env.create(pod, cfg)))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, (code, msg)
    assert f"{CREATE_TIMEOUT:g}s" in msg
    assert time.monotonic() - t0 < CREATE_TIMEOUT + 30
    assert not env.rt.ListContainers(pb.ListContainersRequest()).containers
    assert hung_commands(faulty.rules) == []
    # kubelet retries with the same name: it works once the runtime does.
    faulty.fail()
    cid = env.create(pod, cfg)
    env.rt.StartContainer(pb.StartContainerRequest(container_id=cid))
    assert env.wait_state(cid, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING
    faulty.clean()


def test_start_fails_or_hangs(faulty: Faulty) -> None:
    env = faulty.env
    pod = faulty.pod("start")
    cid = env.create(pod, env.config("app", ["sleep", "1000"]))
    for action, want in faulty.each_fault("start"):
        code, msg = _code(rpc_error(lambda: env.rt.StartContainer(
            pb.StartContainerRequest(container_id=cid))))
        assert code == want, (action, code, msg)
        assert ("injected start failure" if action == "fail"
                else f"{COMMAND_TIMEOUT:g}s") in msg
        # Never reported running: it is still only created.
        assert env.status(cid).status.state == pb.CONTAINER_CREATED
    env.rt.StartContainer(pb.StartContainerRequest(container_id=cid))
    assert env.wait_state(cid, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING
    assert env.exec(cid, ["true"]).exit_code == 0
    faulty.clean()


def test_kill_fails_or_hangs(faulty: Faulty) -> None:
    env = faulty.env
    pod = faulty.pod("kill")
    cid = env.run(pod, "app", ["sleep", "1000"])
    env.wait_state(cid, pb.CONTAINER_RUNNING)
    for action, want in faulty.each_fault("kill"):
        code, msg = _code(rpc_error(lambda: env.rt.StopContainer(
            pb.StopContainerRequest(container_id=cid, timeout=1))))
        assert code == want, (action, code, msg)
        # The container was never signalled: it runs, and says so.
        assert env.status(cid).status.state == pb.CONTAINER_RUNNING
        assert env.exec(cid, ["true"]).exit_code == 0
    env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=1))
    assert env.status(cid).status.state == pb.CONTAINER_EXITED
    faulty.clean()


def test_delete_fails_or_hangs(faulty: Faulty) -> None:
    env = faulty.env
    pod = faulty.pod("delete")
    for action, want in faulty.each_fault("delete"):
        faulty.fail()
        cid = env.run(pod, f"app-{action}", ["sleep", "1000"])
        env.wait_state(cid, pb.CONTAINER_RUNNING)
        faulty.fail(delete=action)
        # The stop itself works: the container exits and is reported so.
        env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=1))
        assert env.status(cid).status.state == pb.CONTAINER_EXITED
        code, msg = _code(rpc_error(lambda cid=cid: env.rt.RemoveContainer(  # type: ignore[misc]
            pb.RemoveContainerRequest(container_id=cid))))
        assert code == want, (action, code, msg)
        # Still listed (exited), so that kubelet's retry can finish the removal.
        assert env.status(cid).status.state == pb.CONTAINER_EXITED
        faulty.fail()
        env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
        assert not env.rt.ListContainers(pb.ListContainersRequest()).containers
    faulty.clean()


def test_exec_fails_or_hangs(faulty: Faulty) -> None:
    env = faulty.env
    pod = faulty.pod("exec")
    cid = env.run(pod, "app", ["sleep", "1000"])
    env.wait_state(cid, pb.CONTAINER_RUNNING)
    faulty.fail(exec="fail")
    code, msg = _code(rpc_error(lambda: env.exec(cid, ["true"])))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "injected exec failure" in msg
    faulty.fail(exec="hang")
    code, msg = _code(rpc_error(lambda: env.exec(cid, ["true"], timeout=2)))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, (code, msg)
    assert hung_commands(faulty.rules) == []
    faulty.fail()
    assert env.exec(cid, ["true"]).exit_code == 0
    assert env.status(cid).status.state == pb.CONTAINER_RUNNING
    faulty.clean()
