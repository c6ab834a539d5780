"""Confinement end to end, with the real daemon, runc and the kernel: seccomp profiles
(RuntimeDefault, Localhost, the empty-profile switch through a SIGHUP reload), capabilities
of non-root users, and no_new_privs against a setuid-root program.

The image is busybox plus ``confinement_probe.c`` built static here, installed twice:
``/usr/bin/probe`` and the setuid-root ``/usr/bin/suid-probe``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from moorage.cri.v1 import api_pb2 as pb
from tests.e2e.test_containers import Env, env, rpc_error  # noqa: F401 - env is a fixture
from tests.fixtures.oci import Image, Layer, busybox_layer, push_image
from tests.fixtures.registry import Registry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

PROBE_SOURCE = Path(__file__).with_name("confinement_probe.c")
EPERM = 1
CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("needs gcc with a static libc (Debian packages gcc, libc6-dev)")
    out = tmp_path_factory.mktemp("probe") / "probe"
    subprocess.run([gcc, "-static", "-O2", "-o", str(out), str(PROBE_SOURCE)], check=True,
                   capture_output=True, timeout=120)
    return out.read_bytes()


@pytest.fixture(scope="module")
def busybox_ref(registry: Registry, probe: bytes) -> str:
    """The image the ``env`` fixture pulls: busybox and the probes."""
    probes = (Layer()
              .add_file("usr/bin/probe", probe, mode=0o755)
              .add_file("usr/bin/suid-probe", probe, mode=0o4755, uid=0, gid=0)
              .build("gzip"))
    push_image(registry, "e2e/confinement", "1", Image(layers=[busybox_layer("gzip"), probes]))
    return registry.ref("e2e/confinement", "1")


def security(**kw: Any) -> pb.LinuxContainerConfig:
    return pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(**kw))


def seccomp(kind: int, ref: str = "") -> pb.SecurityProfile:
    return pb.SecurityProfile(profile_type=kind, localhost_ref=ref)  # type: ignore[arg-type]


RUNTIME_DEFAULT = seccomp(pb.SecurityProfile.RuntimeDefault)
UNCONFINED = seccomp(pb.SecurityProfile.Unconfined)


def output(env: Env, pod: str, name: str, cmd: list[str],  # noqa: F811 - env is the fixture
           **kw: object) -> str:
    """Run ``cmd`` to completion; its stdout."""
    cid = env.run(pod, name, cmd, **kw)
    st = env.wait_state(cid, pb.CONTAINER_EXITED, timeout=60)
    assert st.state == pb.CONTAINER_EXITED, (name, st)
    return "\n".join(text.decode() for stream, _, text in env.log_lines(cid)
                     if stream == b"stdout")


def status_fields(text: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def runtime_spec(env: Env, cid: str) -> dict[str, object]:  # noqa: F811
    spec: dict[str, object] = json.loads(env.status(cid, verbose=True).info["info"])[
        "runtimeSpec"]
    return spec


def test_runtime_default_blocks_keyctl_unshare_mount(env: Env) -> None:  # noqa: F811
    pod = env.pod()
    confined = security(seccomp=RUNTIME_DEFAULT)
    for op in ("keyctl", "unshare", "mount"):
        assert output(env, pod, f"rd-{op}", ["/usr/bin/probe", op], linux=confined
                      ) == f"{op} errno={EPERM}"
    status = status_fields(output(env, pod, "rd-status", ["cat", "/proc/self/status"],
                                  linux=confined))
    assert status["Seccomp"] == "2"  # a filter is installed
    # ExecSync (exec probes) runs under the container's filter too.
    sleeper = env.run(pod, "rd-sleeper", ["sleep", "1000"], linux=confined)
    assert env.wait_state(sleeper, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING
    got = env.exec(sleeper, ["/usr/bin/probe", "keyctl"])
    assert (got.exit_code, got.stdout.decode().strip()) == (1, f"keyctl errno={EPERM}")
    env.rt.StopContainer(pb.StopContainerRequest(container_id=sleeper, timeout=0))
    # Unconfined, the same container reaches the keyring: the filter made the difference.
    open_ = security(seccomp=UNCONFINED)
    assert output(env, pod, "un-keyctl", ["/usr/bin/probe", "keyctl"], linux=open_
                  ) == "keyctl ok"
    assert status_fields(output(env, pod, "un-status", ["cat", "/proc/self/status"],
                                linux=open_))["Seccomp"] == "0"


def test_cap_sys_admin_unlocks_mount_but_not_the_keyring(env: Env) -> None:  # noqa: F811
    pod = env.pod()
    admin = security(seccomp=RUNTIME_DEFAULT,
                     capabilities=pb.Capability(add_capabilities=["SYS_ADMIN"]))
    assert output(env, pod, "admin-mount", ["/usr/bin/probe", "mount"], linux=admin
                  ) == "mount ok"
    assert output(env, pod, "admin-keyctl", ["/usr/bin/probe", "keyctl"], linux=admin
                  ) == f"keyctl errno={EPERM}"


def test_localhost_profile(env: Env) -> None:  # noqa: F811
    profile = env.tmp / "no-mkdir.json"
    profile.write_text(json.dumps({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO",
                      "errnoRet": 13, "comment": "EACCES"}],
    }))
    pod = env.pod()
    linux = security(seccomp=seccomp(pb.SecurityProfile.Localhost, str(profile)))
    assert output(env, pod, "local", ["/usr/bin/probe", "mkdir", "/tmp/d"], linux=linux
                  ) == "mkdir errno=13"
    # The older string field, localhost/<path>.
    legacy = security(seccomp_profile_path=f"localhost/{profile}")
    assert output(env, pod, "legacy", ["/usr/bin/probe", "mkdir", "/tmp/d"], linux=legacy
                  ) == "mkdir errno=13"
    # A missing profile: NOT_FOUND naming the field and the path, and no container left.
    before = {c.id for c in env.rt.ListContainers(pb.ListContainersRequest()).containers}
    missing = env.tmp / "missing.json"
    cfg = env.config("gone", ["true"],
                     linux=security(seccomp=seccomp(pb.SecurityProfile.Localhost, str(missing))))
    e = rpc_error(lambda: env.create(pod, cfg))
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert "seccomp.localhost_ref" in (e.details() or "") and str(missing) in (e.details() or "")
    bad = env.tmp / "bad.json"
    bad.write_text('{"defaultAction": "SCMP_ACT_SOMETIMES"}')
    cfg = env.config("bad", ["true"],
                     linux=security(seccomp=seccomp(pb.SecurityProfile.Localhost, str(bad))))
    e = rpc_error(lambda: env.create(pod, cfg))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and str(bad) in (e.details() or "")
    after = {c.id for c in env.rt.ListContainers(pb.ListContainersRequest()).containers}
    assert after == before


def test_default_when_empty_switched_on_by_sighup(env: Env) -> None:  # noqa: F811
    pod = env.pod()
    cid = env.run(pod, "before", ["cat", "/proc/self/status"])
    env.wait_state(cid, pb.CONTAINER_EXITED, timeout=60)
    assert "seccomp" not in runtime_spec(env, cid)["linux"]  # type: ignore[operator]
    drop = env.d.base / "moorage.d" / "50-seccomp.toml"
    drop.write_text("[runtime]\nseccomp_use_default_when_empty = true\n")
    assert env.d.proc is not None
    env.d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while "runtime.seccomp_use_default_when_empty" not in env.d.log_path.read_text():
        assert time.monotonic() < deadline, env.d.log_tail()
        time.sleep(0.1)
    assert "needs_restart=[]" in env.d.log_path.read_text().split("daemon.reloaded")[-1]
    status = status_fields(output(env, pod, "after", ["cat", "/proc/self/status"]))
    assert status["Seccomp"] == "2"
    assert output(env, pod, "after-keyctl", ["/usr/bin/probe", "keyctl"]) == (
        f"keyctl errno={EPERM}")
    # Asking for Unconfined still gets it.
    assert status_fields(output(env, pod, "asked", ["cat", "/proc/self/status"],
                                linux=security(seccomp=UNCONFINED)))["Seccomp"] == "0"


def test_non_root_gets_no_capabilities(env: Env) -> None:  # noqa: F811
    pod = env.pod()
    adds = pb.Capability(add_capabilities=["NET_ADMIN", "SYS_ADMIN"])
    user = security(run_as_user=pb.Int64Value(value=1000), capabilities=adds)
    caps = status_fields(output(env, pod, "user", ["cat", "/proc/self/status"], linux=user))
    assert int(caps["CapEff"], 16) == 0 and int(caps["CapPrm"], 16) == 0
    assert int(caps["CapAmb"], 16) == 0 and int(caps["CapInh"], 16) == 0
    bounding = int(caps["CapBnd"], 16)
    assert bounding >> CAP_NET_ADMIN & 1 and bounding >> CAP_SYS_ADMIN & 1  # as CRI-O sends
    # The same request as root: the capabilities are there.
    root = status_fields(output(env, pod, "root", ["cat", "/proc/self/status"],
                                linux=security(capabilities=adds)))
    eff = int(root["CapEff"], 16)
    assert eff >> CAP_NET_ADMIN & 1 and eff >> CAP_SYS_ADMIN & 1


def test_no_new_privs_stops_a_setuid_root_program(env: Env) -> None:  # noqa: F811
    pod = env.pod()
    uid = pb.Int64Value(value=1000)
    # Without no_new_privs the setuid bit works (this is what no_new_privs prevents).
    assert output(env, pod, "suid", ["/usr/bin/suid-probe", "ids"],
                  linux=security(run_as_user=uid)) == "uid=1000 euid=0"
    # allowPrivilegeEscalation: false -> no_new_privs: the bit is ignored.
    nnp = security(run_as_user=uid, no_new_privs=True)
    assert output(env, pod, "nnp", ["/usr/bin/suid-probe", "ids"], linux=nnp
                  ) == "uid=1000 euid=1000"
    status = status_fields(output(env, pod, "nnp-status", ["cat", "/proc/self/status"],
                                  linux=nnp))
    assert status["NoNewPrivs"] == "1" and int(status["CapEff"], 16) == 0
