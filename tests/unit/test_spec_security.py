"""Capabilities, privileged containers, masked and read-only paths, the device cgroup,
namespaces, seccomp and AppArmor in the document, oom_score_adj."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from moorage.container import defaults
from moorage.container.model import SecurityProfile
from moorage.container.spec import capabilities, host_capabilities
from moorage.errors import FailedPrecondition, InvalidArgument
from tests.unit.test_spec_document import ALL_CAPS, V2_NODE, build, make_sandbox, make_spec, opts

DEFAULT = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
]  # by number

# -- capabilities ----------------------------------------------------------------------------------


def caps(**sec: Any) -> dict[str, list[str]]:
    result: dict[str, list[str]] = build(spec=make_spec(sec=sec))["process"]["capabilities"]
    return result


def test_default_capabilities() -> None:
    c = caps()
    assert c["bounding"] == c["effective"] == c["permitted"] == DEFAULT
    assert c["inheritable"] == [] and c["ambient"] == []


@pytest.mark.parametrize(
    ("add", "drop", "expected"),
    [
        (("NET_ADMIN",), (), sorted([*DEFAULT, "CAP_NET_ADMIN"], key=ALL_CAPS.index)),
        (("cap_sys_time", "Sys_Ptrace"), ("CHOWN", "CAP_KILL"), None),
        ((), ("ALL",), []),
        (("NET_RAW",), ("ALL",), ["CAP_NET_RAW"]),
        (("ALL",), (), list(ALL_CAPS)),
        (("ALL",), ("CHOWN",), list(ALL_CAPS[1:])),
        (("ALL",), ("ALL",), []),  # drop ALL wins, then the named adds
        (("ALL", "MKNOD"), ("all",), ["CAP_MKNOD"]),
        (("NET_ADMIN",), ("NET_ADMIN",), DEFAULT),  # drops come last
    ],
)
def test_add_drop(add: tuple[str, ...], drop: tuple[str, ...], expected: list[str] | None) -> None:
    if expected is None:
        wanted = (set(DEFAULT) | {"CAP_SYS_TIME", "CAP_SYS_PTRACE"}) - {"CAP_CHOWN", "CAP_KILL"}
        expected = sorted(wanted, key=ALL_CAPS.index)
    c = caps(cap_add=add, cap_drop=drop)
    assert c["bounding"] == c["effective"] == c["permitted"] == expected
    assert c["inheritable"] == []


def test_ambient() -> None:
    c = caps(cap_drop=("ALL",), cap_add_ambient=("NET_BIND_SERVICE",))
    assert c["bounding"] == c["effective"] == c["permitted"] == ["CAP_NET_BIND_SERVICE"]
    assert c["inheritable"] == c["ambient"] == ["CAP_NET_BIND_SERVICE"]
    # a drop removes from every set
    c = caps(cap_add_ambient=("NET_RAW",), cap_drop=("NET_RAW",))
    assert "CAP_NET_RAW" not in c["bounding"] and c["ambient"] == [] and c["inheritable"] == []
    with pytest.raises(InvalidArgument, match="add_ambient_capabilities: ALL"):
        caps(cap_add_ambient=("ALL",))


@pytest.mark.parametrize(
    ("sec", "match"),
    [
        ({"cap_add": ("NOPE",)}, r"capabilities.add_capabilities: unknown capability 'NOPE'"),
        ({"cap_drop": ("CAP_FOO",)}, r"drop_capabilities: unknown capability 'CAP_FOO'"),
        ({"cap_add_ambient": ("X",)}, r"add_ambient_capabilities: unknown capability 'X'"),
    ],
)
def test_unknown_capabilities(sec: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        caps(**sec)


def test_all_means_what_the_host_has() -> None:
    # A kernel with cap_last_cap 37 (no PERFMON, BPF, CHECKPOINT_RESTORE), or a daemon
    # without CAP_SYS_RESOURCE: ALL and privileged give what is there, an explicit add of
    # a missing one is refused.
    available = tuple(n for n in ALL_CAPS[:38] if n != "CAP_SYS_RESOURCE")
    o = opts(all_capabilities=available)
    spec = make_spec(sec={"cap_add": ("ALL",)})
    assert build(spec=spec, options=o)["process"]["capabilities"]["bounding"] == list(available)
    with pytest.raises(FailedPrecondition, match="CAP_BPF is not available"):
        build(spec=make_spec(sec={"cap_add": ("BPF",)}), options=o)
    with pytest.raises(FailedPrecondition, match="CAP_SYS_RESOURCE is not available"):
        build(spec=make_spec(sec={"cap_add_ambient": ("SYS_RESOURCE",)}), options=o)
    # dropping one that is not there is fine
    build(spec=make_spec(sec={"cap_drop": ("BPF",)}), options=o)


def test_capabilities_function_defaults_option() -> None:
    sc = make_spec().security
    c = capabilities(sc, ("CAP_KILL", "chown"), ALL_CAPS)
    assert c["bounding"] == ["CAP_CHOWN", "CAP_KILL"]
    c = build(options=opts(default_capabilities=("AUDIT_WRITE",)))["process"]["capabilities"]
    assert c["bounding"] == ["CAP_AUDIT_WRITE"]


def test_host_capabilities_reads_this_process() -> None:
    have = host_capabilities()
    status = Path("/proc/self/status").read_text()
    eff = int(next(x for x in status.splitlines() if x.startswith("CapEff:")).split()[1], 16)
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    assert have == tuple(n for i, n in enumerate(ALL_CAPS) if i <= last and eff >> i & 1)


# -- privileged ------------------------------------------------------------------------------------


def privileged(**sec: Any) -> dict[str, Any]:
    return build(
        spec=make_spec(sec={"privileged": True, **sec}), sandbox=make_sandbox(privileged=True)
    )


def test_privileged() -> None:
    doc = privileged(
        cap_drop=("ALL",),
        masked_paths=("/proc/x",),
        seccomp=SecurityProfile("RuntimeDefault"),
        apparmor=SecurityProfile("Localhost", "p"),
    )
    c = doc["process"]["capabilities"]
    assert c["bounding"] == c["effective"] == c["permitted"] == list(ALL_CAPS)
    assert c["inheritable"] == []
    linux = doc["linux"]
    assert linux["maskedPaths"] == [] and linux["readonlyPaths"] == []
    assert linux["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    null = [d for d in linux["devices"] if d["path"] == "/dev/null"]
    assert null and null[0]["type"] == "c" and (null[0]["major"], null[0]["minor"]) == (1, 3)
    assert not any(d["path"].startswith(("/dev/pts/", "/dev/shm/")) for d in linux["devices"])
    assert "/dev/console" not in {d["path"] for d in linux["devices"]}
    mounts = {m["destination"]: m for m in doc["mounts"]}
    assert "rw" in mounts["/sys"]["options"] and "ro" not in mounts["/sys"]["options"]
    assert "rw" in mounts["/sys/fs/cgroup"]["options"]
    assert "ro" not in mounts["/sys/fs/cgroup"]["options"]


def test_privileged_no_cgroupns_on_v2() -> None:
    sb = make_sandbox(privileged=True)
    doc = build(spec=make_spec(sec={"privileged": True}), sandbox=sb, options=opts(cgroups=V2_NODE))
    assert {"type": "cgroup"} not in doc["linux"]["namespaces"]


def test_privileged_keeps_cri_devices(tmp_path: Any) -> None:
    from moorage.container.model import Device

    doc = build(
        spec=make_spec(
            sec={"privileged": True}, devices=(Device("/dev/mynull", "/dev/null", "r"),)
        ),
        sandbox=make_sandbox(privileged=True),
        options=opts(host_dev=str(tmp_path)),  # an empty /dev
    )
    assert [d["path"] for d in doc["linux"]["devices"]] == ["/dev/mynull"]


# -- masked and read-only paths --------------------------------------------------------------------


def test_masked_readonly_defaults() -> None:
    linux = build()["linux"]
    assert linux["maskedPaths"] == list(defaults.MASKED_PATHS)
    assert "/proc/kcore" in linux["maskedPaths"] and "/proc/keys" in linux["maskedPaths"]
    assert linux["readonlyPaths"] == list(defaults.READONLY_PATHS)
    assert "/proc/sys" in linux["readonlyPaths"]


def test_masked_readonly_given() -> None:
    linux = build(spec=make_spec(sec={"masked_paths": ("/proc/a",), "readonly_paths": ()}))["linux"]
    assert linux["maskedPaths"] == ["/proc/a"]
    assert linux["readonlyPaths"] == []  # an empty list is used as given (procMount Unmasked)


# -- namespaces ------------------------------------------------------------------------------------


def ns_of(doc: dict[str, Any]) -> list[dict[str, str]]:
    result: list[dict[str, str]] = doc["linux"]["namespaces"]
    return result


def test_namespaces_pod() -> None:
    assert ns_of(build()) == [
        {"type": "pid"},
        {"type": "network", "path": "/run/moorage/ns/net/sb1"},
        {"type": "ipc", "path": "/run/moorage/ns/ipc/sb1"},
        {"type": "uts", "path": "/run/moorage/ns/uts/sb1"},
        {"type": "mount"},
    ]


def test_namespaces_host() -> None:
    sb = make_sandbox(net_ns=None, ipc_ns=None, uts_ns=None, host_network=True)
    assert ns_of(build(sandbox=sb, spec=make_spec(sec={"pid_mode": 2}))) == [{"type": "mount"}]


def test_namespaces_pid_modes() -> None:
    sb = make_sandbox(pid_ns="/proc/42/ns/pid")
    doc = build(sandbox=sb, spec=make_spec(sec={"pid_mode": 0}))
    assert ns_of(doc)[0] == {"type": "pid", "path": "/proc/42/ns/pid"}
    with pytest.raises(InvalidArgument, match="no shared PID namespace"):
        build(spec=make_spec(sec={"pid_mode": 0}))
    spec = make_spec(sec={"pid_mode": 3, "target_id": "other"})
    doc = build(spec=spec, target_pid_ns="/proc/77/ns/pid")
    assert ns_of(doc)[0] == {"type": "pid", "path": "/proc/77/ns/pid"}
    with pytest.raises(InvalidArgument, match="target_id: PID namespace of container 'other'"):
        build(spec=spec)
    with pytest.raises(InvalidArgument, match="unknown mode 9"):
        build(spec=make_spec(sec={"pid_mode": 9}))


def test_cgroup_namespace_on_v2() -> None:
    assert {"type": "cgroup"} in ns_of(build(options=opts(cgroups=V2_NODE)))
    assert {"type": "cgroup"} not in ns_of(build())


# -- seccomp, AppArmor (details: test_seccomp.py, test_apparmor.py) -------------------------------


def test_unconfined_profiles_accepted() -> None:
    doc = build(spec=make_spec(sec={"seccomp": SecurityProfile("Unconfined"),
                                    "apparmor": SecurityProfile("Unconfined")}))
    assert "seccomp" not in doc["linux"] and "apparmorProfile" not in doc["process"]


def test_runtime_default_profiles() -> None:
    sec = {"seccomp": SecurityProfile("RuntimeDefault"),
           "apparmor": SecurityProfile("RuntimeDefault")}
    doc = build(spec=make_spec(sec=sec))
    assert doc["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_ERRNO"
    assert "apparmorProfile" not in doc["process"]  # no AppArmor on this (test) host: none
    on = opts(apparmor_enabled=True, apparmor_loaded=frozenset({"moorage-default"}))
    assert build(spec=make_spec(sec=sec), options=on)["process"]["apparmorProfile"] == (
        "moorage-default")


def test_apparmor_localhost_refused_without_apparmor() -> None:
    with pytest.raises(FailedPrecondition, match="AppArmor is not enabled on this host"):
        build(spec=make_spec(sec={"apparmor": SecurityProfile("Localhost", "k8s-x")}))


def test_device_cgroup_defaults() -> None:
    rules = build()["linux"]["resources"]["devices"]
    assert rules[0] == {"allow": False, "access": "rwm"}  # deny all first
    allowed = {(r.get("type"), r.get("major"), r.get("minor"), r["access"]) for r in rules[1:]}
    assert allowed == {
        ("c", None, None, "m"), ("b", None, None, "m"),  # mknod of anything
        ("c", 1, 3, "rwm"), ("c", 1, 5, "rwm"), ("c", 1, 7, "rwm"),  # null zero full
        ("c", 1, 8, "rwm"), ("c", 1, 9, "rwm"),  # random urandom
        ("c", 5, 0, "rwm"), ("c", 5, 1, "rwm"), ("c", 5, 2, "rwm"),  # tty console ptmx
        ("c", 136, None, "rwm"),  # /dev/pts/*
    }


# -- oom_score_adj ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("adj", "restrict", "daemon", "expected"),
    [
        (0, False, -999, 0),
        (-998, False, -999, -998),
        (-998, True, 0, 0),  # clamped to the daemon's own
        (1000, True, 0, 1000),
        (-500, True, -999, -500),
    ],
)
def test_oom_score_adj(adj: int, restrict: bool, daemon: int, expected: int) -> None:
    from moorage.container.model import ContainerResources

    spec = make_spec(resources=ContainerResources(oom_score_adj=adj))
    o = opts(restrict_oom_score_adj=restrict, daemon_oom_score_adj=daemon)
    assert build(spec=spec, options=o)["process"]["oomScoreAdj"] == expected


def test_oom_score_adj_range() -> None:
    from moorage.container.model import ContainerResources

    with pytest.raises(InvalidArgument, match="oom_score_adj: 1001"):
        build(spec=make_spec(resources=ContainerResources(oom_score_adj=1001)))


def test_privileged_ignores_adds_and_drops_keeps_ambient() -> None:
    available = tuple(n for n in ALL_CAPS if n != "CAP_BPF")
    doc = build(
        spec=make_spec(
            sec={
                "privileged": True,
                "cap_add": ("BPF",),  # not here, but ignored
                "cap_drop": ("NET_RAW",),  # ignored too
                "cap_add_ambient": ("NET_RAW",),
            }
        ),
        sandbox=make_sandbox(privileged=True),
        options=opts(all_capabilities=available),
    )
    c = doc["process"]["capabilities"]
    assert c["bounding"] == list(available)
    assert c["ambient"] == c["inheritable"] == ["CAP_NET_RAW"]
