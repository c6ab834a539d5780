"""CDI devices end to end: spec files (YAML and JSON) in the daemon's private spec dirs give
a real runc container device nodes, env vars, a mount, a hook and a group, named by the
CRI CDI_devices field and by cdi.k8s.io annotations; unknown devices are refused."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from moorage.cri.v1 import api_pb2 as pb
from tests.e2e.test_containers import Env, rpc_error, running_env
from tests.fixtures.oci import Image, push_image
from tests.fixtures.registry import Registry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture(scope="module")
def busybox_ref(registry: Registry) -> str:
    push_image(registry, "e2e/cdi-busybox", "1", Image.busybox())
    return registry.ref("e2e/cdi-busybox", "1")


def _specs(base: Path) -> tuple[Path, Path]:
    static, dynamic = base / "cdi-static", base / "cdi-dynamic"
    static.mkdir()
    dynamic.mkdir()
    data = base / "cdi-data"
    data.mkdir()
    (data / "hello").write_text("from the CDI mount\n")
    vendor = {
        "cdiVersion": "0.7.0",
        "kind": "moorage.test/dev",
        "containerEdits": {
            "env": ["CDI_SPEC_LEVEL=yes"],
            "hooks": [{"hookName": "createRuntime", "path": "/bin/sh",
                       "args": ["sh", "-c", f'echo "$CDI_HOOK" > {base}/hook-ran'],
                       "env": ["CDI_HOOK=ran"]}],
        },
        "devices": [
            {"name": "null0", "containerEdits": {
                "env": ["CDI_DEVICE=null0"],
                # /dev/null's node under another path: type and numbers from the host.
                "deviceNodes": [{"path": "/dev/cdi-null", "hostPath": "/dev/null"}],
                "mounts": [{"hostPath": str(data), "containerPath": "/cdi-data",
                            "options": ["ro", "nosuid", "nodev", "bind"]}],
                "additionalGids": [4242]}},
            {"name": "zero-like", "containerEdits": {
                "deviceNodes": [{"path": "/dev/cdi-zero", "type": "c", "major": 1,
                                 "minor": 5, "permissions": "rw"}]}},
        ],
    }
    (static / "vendor.yaml").write_text(yaml.safe_dump(vendor))
    other = {"cdiVersion": "0.3.0", "kind": "moorage.test/json",
             "devices": [{"name": "j", "containerEdits": {"env": ["CDI_JSON=1"]}}]}
    (dynamic / "other.json").write_text(json.dumps(other))
    return static, dynamic


@pytest.fixture
def env(tmp_path: Path, node_ns: str, cni_dir: Path, registry: Registry,
        busybox_ref: str) -> Iterator[Env]:
    static, dynamic = _specs(tmp_path)
    extra = f'[cdi]\nspec_dirs = ["{static}", "{dynamic}"]\n'
    with running_env(tmp_path, node_ns, cni_dir, registry, busybox_ref,
                     config_extra=extra) as e:
        yield e


def _out(env: Env, cid: str, *cmd: str) -> str:
    r = env.exec(cid, list(cmd))
    assert r.exit_code == 0, (cmd, r.stdout, r.stderr)
    return r.stdout.decode()


def test_cdi_devices_reach_the_container(env: Env, tmp_path: Path) -> None:
    pod = env.pod()
    cfg = env.config("gpu", ["sleep", "1000"])
    cfg.annotations["cdi.k8s.io/test_j"] = "moorage.test/json=j"
    cfg.CDI_devices.add(name="moorage.test/dev=null0")
    cfg.CDI_devices.add(name="moorage.test/dev=zero-like")
    cid = env.create(pod, cfg)
    env.rt.StartContainer(pb.StartContainerRequest(container_id=cid))
    assert env.wait_state(cid, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING
    null = os.stat("/dev/null").st_rdev
    # Device nodes: /dev/null's numbers at another path, and one given in full.
    assert _out(env, cid, "stat", "-c", "%F %t %T", "/dev/cdi-null").strip() == (
        f"character special file {os.major(null):x} {os.minor(null):x}")
    assert _out(env, cid, "sh", "-c", "echo gone > /dev/cdi-null && wc -c < /dev/cdi-null"
                ).strip() == "0"
    assert _out(env, cid, "sh", "-c", "head -c 4 /dev/cdi-zero | wc -c").strip() == "4"
    # Env of the spec, the device and the annotation's device.
    environ = _out(env, cid, "env").splitlines()
    assert {"CDI_SPEC_LEVEL=yes", "CDI_DEVICE=null0", "CDI_JSON=1"} <= set(environ)
    # The mount, read-only.
    assert _out(env, cid, "cat", "/cdi-data/hello") == "from the CDI mount\n"
    r = env.exec(cid, ["touch", "/cdi-data/new"])
    assert r.exit_code != 0 and b"Read-only file system" in r.stderr
    # The group, in the process and in ContainerStatus.
    assert "4242" in _out(env, cid, "id", "-G").split()
    assert 4242 in env.status(cid).status.user.linux.supplemental_groups
    # The spec's createRuntime hook ran on the host with its env.
    assert (tmp_path / "hook-ran").read_text() == "ran\n"
    spec = json.loads(env.status(cid, verbose=True).info["info"])["runtimeSpec"]
    assert [h["path"] for h in spec["hooks"]["createRuntime"]] == ["/bin/sh"]
    rules = [r for r in spec["linux"]["resources"]["devices"] if r.get("major") == 1
             and r.get("minor") == 5 and r.get("access") == "rw"]
    assert rules


def test_unknown_cdi_devices_are_refused(env: Env, tmp_path: Path) -> None:
    pod = env.pod()
    cases = [
        (["moorage.test/dev=nope"], {},
         "config.CDI_devices[0].name: unresolvable CDI device 'moorage.test/dev=nope'"),
        (["other.vendor/gpu=0"], {}, "unresolvable CDI device 'other.vendor/gpu=0'"),
        (["null0"], {}, "config.CDI_devices[0].name: 'null0' is not a fully qualified"),
        ([], {"cdi.k8s.io/x": "moorage.test/dev=null0,nope"},
         "config.annotations['cdi.k8s.io/x']: 'nope' is not a fully qualified"),
    ]
    for devices, extra, message in cases:
        cfg = env.config("c", ["true"])
        cfg.annotations.update(extra)
        for name in devices:
            cfg.CDI_devices.add(name=name)
        e = rpc_error(lambda cfg=cfg: env.create(pod, cfg))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
        assert message in str(e.details()), e.details()
    assert not env.rt.ListContainers(pb.ListContainersRequest()).containers
    # A spec file broken later: the request says what is wrong with it.
    (tmp_path / "cdi-static" / "vendor.yaml").write_text("cdiVersion: 0.3.0\nkind: nope\n")
    cfg = env.config("c", ["true"])
    cfg.CDI_devices.add(name="moorage.test/dev=null0")
    e = rpc_error(lambda: env.create(pod, cfg))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "kind 'nope' is not <vendor>/<class>" in str(e.details())
    assert not (tmp_path / "hook-ran").exists()
