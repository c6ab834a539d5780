"""Seccomp: the built-in RuntimeDefault profile as data, both profile formats, Localhost
files, the spec's ``linux.seccomp``, the CRI conversion and the config keys."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from moorage import config, daemon
from moorage.container import defaults, seccomp
from moorage.container.model import SecurityProfile
from moorage.cri.v1 import api_pb2 as pb
from moorage.errors import FailedPrecondition, InvalidArgument, NotFound
from moorage.server.container import spec_from_proto
from tests.unit.test_spec_document import ALL_CAPS, build, make_sandbox, make_spec, opts

DEFAULT_CAPS = [f"CAP_{c}" for c in defaults.CAPABILITIES]
CLONE_NS_MASK = 0x7E020000  # every CLONE_NEW* flag


def render(caps: list[str] | None = None, machine: str = "x86_64", kernel: str = "6.1.0",
           profile: seccomp.Profile | None = None) -> dict[str, Any]:
    return seccomp.render(profile or seccomp.builtin(),
                          DEFAULT_CAPS if caps is None else caps, machine=machine, kernel=kernel)


def unconditional(doc: dict[str, Any]) -> set[str]:
    """System calls allowed whatever their arguments."""
    return {n for r in doc["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" and "args" not in r
            for n in r["names"]}


def rules_for(doc: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [r for r in doc["syscalls"] if name in r["names"]]


# -- the built-in profile ------------------------------------------------------------------------


def test_builtin_profile_shape() -> None:
    doc = render()
    assert doc["defaultAction"] == "SCMP_ACT_ERRNO" and doc["defaultErrnoRet"] == 1  # EPERM
    assert doc["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    assert render(machine="aarch64")["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    # Only OCI keys reach runc: no comments, no includes/excludes, no 'blocked' table.
    assert set(doc) == {"defaultAction", "defaultErrnoRet", "architectures", "syscalls"}
    for rule in doc["syscalls"]:
        assert set(rule) <= {"names", "action", "errnoRet", "args"}
    text = json.dumps(doc)
    assert "comment" not in text and "reason" not in text
    # The ordinary calls a shell and runc's init need are there.
    assert {"read", "write", "openat", "execve", "exit_group", "capset", "setresuid", "prctl",
            "wait4", "rt_sigaction", "mmap", "futex", "socketpair", "arch_prctl"
            } <= unconditional(doc)


def test_every_blocked_family_has_a_reason_and_is_blocked() -> None:
    table = seccomp.blocked()
    assert len(table) >= 10
    doc = render()
    allowed = unconditional(doc)
    for names, reason in table:
        assert names and len(reason) > 20
        for name in names:
            assert name not in allowed, f"{name} is blocked with reason {reason!r}"
    blocked_names = {n for names, _ in table for n in names}
    # What Docker's and containers-common's default profiles block, and what issue #7 names.
    assert {"keyctl", "add_key", "request_key", "unshare", "setns", "mount", "umount2",
            "pivot_root", "kexec_load", "init_module", "reboot", "swapon", "bpf",
            "perf_event_open", "userfaultfd", "open_by_handle_at", "io_uring_setup",
            "clock_settime", "kcmp", "iopl", "acct", "chroot", "sethostname"} <= blocked_names


def test_keyctl_unshare_mount_and_cap_sys_admin() -> None:
    plain = unconditional(render())
    assert not {"keyctl", "unshare", "mount", "setns", "umount2", "clone3"} & plain
    admin = unconditional(render([*DEFAULT_CAPS, "CAP_SYS_ADMIN"]))
    assert {"unshare", "mount", "setns", "umount2", "clone", "clone3", "fsopen",
            "sethostname"} <= admin
    assert "keyctl" not in admin  # the keyring stays blocked whatever the capabilities


def test_clone_without_namespace_flags() -> None:
    [rule] = rules_for(render(), "clone")
    assert rule["action"] == "SCMP_ACT_ALLOW"
    assert rule["args"] == [{"index": 0, "value": CLONE_NS_MASK, "op": "SCMP_CMP_MASKED_EQ"}]
    [s390] = rules_for(render(machine="s390x"), "clone")
    assert s390["args"][0]["index"] == 1  # s390 passes the flags second
    # clone3 hides its flags in memory: ENOSYS, so libc falls back to clone.
    [rule3] = rules_for(render(), "clone3")
    assert rule3 == {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
    admin = render([*DEFAULT_CAPS, "CAP_SYS_ADMIN"])
    assert all(r["action"] == "SCMP_ACT_ALLOW" and "args" not in r
               for r in rules_for(admin, "clone") + rules_for(admin, "clone3"))


def test_personality_only_known_personas() -> None:
    values = sorted(r["args"][0]["value"] for r in rules_for(render(), "personality"))
    assert values == [0, 8, 0x20000, 0x20008, 0xFFFFFFFF]
    assert all(r["args"][0]["op"] == "SCMP_CMP_EQ" for r in rules_for(render(), "personality"))


def test_socket_every_family_but_vsock() -> None:
    [rule] = rules_for(render(), "socket")
    assert rule["args"] == [{"index": 0, "value": 40, "op": "SCMP_CMP_NE"}]


@pytest.mark.parametrize(("cap", "names"), [
    ("CAP_SYS_CHROOT", {"chroot"}),
    ("CAP_SYS_MODULE", {"init_module", "finit_module", "delete_module"}),
    ("CAP_SYS_TIME", {"settimeofday", "clock_settime"}),
    ("CAP_SYS_PTRACE", {"kcmp", "pidfd_getfd", "process_madvise"}),
    ("CAP_SYS_BOOT", {"reboot"}),
    ("CAP_SYS_NICE", {"mbind", "set_mempolicy"}),
    ("CAP_SYSLOG", {"syslog"}),
    ("CAP_BPF", {"bpf"}),
    ("CAP_PERFMON", {"perf_event_open"}),
    ("CAP_DAC_READ_SEARCH", {"open_by_handle_at"}),
    ("CAP_SYS_RAWIO", {"iopl", "ioperm"}),
])
def test_capability_gated(cap: str, names: set[str]) -> None:
    assert not names & unconditional(render())
    assert names <= unconditional(render([*DEFAULT_CAPS, cap]))


def test_ptrace_needs_a_kernel_where_it_cannot_bypass_seccomp() -> None:
    assert "ptrace" in unconditional(render(kernel="4.8.0"))
    assert "ptrace" not in unconditional(render(kernel="4.4.0-210-generic"))
    assert "ptrace" in unconditional(render([*DEFAULT_CAPS, "CAP_SYS_PTRACE"], kernel="4.4.0"))


def test_architecture_specific_calls() -> None:
    x86, arm = unconditional(render()), unconditional(render(machine="aarch64"))
    assert "arch_prctl" in x86 and "modify_ldt" in x86 and "set_tls" not in x86
    assert "set_tls" in arm and "cacheflush" in arm and "arch_prctl" not in arm


def test_io_uring_and_obsolete_calls_stay_blocked() -> None:
    everything = unconditional(render(list(ALL_CAPS)))
    assert not {"io_uring_setup", "io_uring_enter", "keyctl", "userfaultfd", "kexec_load",
                "swapon", "uselib", "vm86"} & everything


# -- other profiles: both formats -----------------------------------------------------------------

DOCKER_STYLE = {
    "defaultAction": "SCMP_ACT_ALLOW",
    "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]}],
    "syscalls": [
        {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13,
         "comment": "no new directories"},
        {"name": "chmod", "action": "SCMP_ACT_ERRNO"},  # the older single-name form
        {"names": ["sethostname"], "action": "SCMP_ACT_ERRNO",
         "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
        {"names": ["arch_prctl"], "action": "SCMP_ACT_LOG", "includes": {"arches": ["arm64"]}},
        {"names": ["kill"], "action": "SCMP_ACT_ERRNO",
         "args": [{"index": 1, "value": 9, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]},
    ],
}


def test_docker_format_is_converted() -> None:
    profile = seccomp.parse(json.dumps(DOCKER_STYLE), "test")
    doc = render(profile=profile)
    assert doc == {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
            {"names": ["chmod"], "action": "SCMP_ACT_ERRNO"},
            {"names": ["sethostname"], "action": "SCMP_ACT_ERRNO"},
            {"names": ["kill"], "action": "SCMP_ACT_ERRNO",
             "args": [{"index": 1, "value": 9, "op": "SCMP_CMP_EQ"}]},
        ],
    }
    admin = render([*DEFAULT_CAPS, "CAP_SYS_ADMIN"], profile=profile)
    assert not rules_for(admin, "sethostname")
    # a native architecture the archMap does not name: runc's native default
    assert "architectures" not in render(machine="riscv64", profile=profile)


def test_oci_format_passes_through() -> None:
    oci = {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
           "architectures": ["SCMP_ARCH_X86_64"], "flags": ["SECCOMP_FILTER_FLAG_LOG"],
           "syscalls": [{"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"}]}
    assert render(profile=seccomp.parse(json.dumps(oci), "oci")) == oci


@pytest.mark.parametrize(("doc", "match"), [
    ("{", "not valid JSON"),
    ("[]", "is not a JSON object"),
    ({"defaultAction": "SCMP_ACT_MAYBE"}, "defaultAction: unknown action 'SCMP_ACT_MAYBE'"),
    ({"defaultAction": "SCMP_ACT_NOTIFY"}, "needs a seccomp agent"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "defaultErrnoRet": 1}, "defaultErrnoRet"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/agent.sock"}, "listenerPath"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": {}}, "syscalls: is not a list"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": [], "action": "SCMP_ACT_LOG"}]},
     r"syscalls\[0\]: names no system call"),
    ({"defaultAction": "SCMP_ACT_ALLOW",
      "syscalls": [{"names": ["Read!"], "action": "SCMP_ACT_LOG"}]}, "'Read!' is not valid"),
    ({"defaultAction": "SCMP_ACT_ALLOW",
      "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW", "errnoRet": 1}]},
     r"syscalls\[0\].errnoRet: only goes with SCMP_ACT_ERRNO"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "X"}]},
     r"syscalls\[0\].action: unknown action"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["kill"], "action": "SCMP_ACT_ERRNO",
         "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]},
     r"args\[0\].index: 6 is not an argument index"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["kill"], "action": "SCMP_ACT_ERRNO",
         "args": [{"index": 0, "value": -1, "op": "SCMP_CMP_EQ"}]}]}, r"args\[0\].value"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["kill"], "action": "SCMP_ACT_ERRNO",
         "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_SIMILAR"}]}]}, "unknown operator"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["kill"], "action": "SCMP_ACT_LOG", "includes": {"minKernel": "new"}}]},
     "minKernel: 'new' is not a kernel version"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["x86_64"]},
     "architectures: 'x86_64' is not valid"),
])
def test_invalid_profiles(doc: Any, match: str) -> None:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(InvalidArgument, match=match) as e:
        seccomp.parse(text, "profile /p.json")
    assert e.value.message.startswith("profile /p.json")


# -- Localhost files ------------------------------------------------------------------------------

FIELD = "config.linux.security_context.seccomp.localhost_ref"


def test_load_file(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(DOCKER_STYLE))
    assert seccomp.load_file(str(path), FIELD).default_action == "SCMP_ACT_ALLOW"
    link = tmp_path / "link.json"
    link.symlink_to(path)  # followed, as CRI-O and containerd do
    assert seccomp.load_file(str(link), FIELD).rules


def test_load_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(NotFound, match=f"{FIELD}: seccomp profile {missing} does not exist"):
        seccomp.load_file(str(missing), FIELD)
    with pytest.raises(InvalidArgument, match="'profile.json' is not an absolute path"):
        seccomp.load_file("profile.json", FIELD)
    with pytest.raises(InvalidArgument, match="is not a path"):
        seccomp.load_file("", FIELD)
    with pytest.raises(InvalidArgument, match=f"{tmp_path} is not a regular file"):
        seccomp.load_file(str(tmp_path), FIELD)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opened without blocking, then refused
    with pytest.raises(InvalidArgument, match="is not a regular file"):
        seccomp.load_file(str(fifo), FIELD)
    big = tmp_path / "big.json"
    big.write_text(" " * (seccomp.MAX_PROFILE_SIZE + 1))
    with pytest.raises(InvalidArgument, match="larger than"):
        seccomp.load_file(str(big), FIELD)
    bad = tmp_path / "bad.json"
    bad.write_text('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["x"]}]}')
    with pytest.raises(InvalidArgument, match=rf"{FIELD}: seccomp profile {bad}: "
                       r"syscalls\[0\].action: unknown action None"):
        seccomp.load_file(str(bad), FIELD)


# -- the spec -------------------------------------------------------------------------------------


def linux_seccomp(options: dict[str, Any] | None = None, **sec: Any) -> Any:
    return build(spec=make_spec(sec=sec), options=opts(**(options or {})))["linux"].get("seccomp")


def test_spec_runtime_default_follows_the_bounding_set() -> None:
    doc = linux_seccomp(seccomp=SecurityProfile("RuntimeDefault"))
    assert doc == seccomp.render(seccomp.builtin(), DEFAULT_CAPS)
    assert not {"mount", "unshare"} & unconditional(doc)
    admin = linux_seccomp(seccomp=SecurityProfile("RuntimeDefault"), cap_add=("SYS_ADMIN",))
    assert {"mount", "unshare"} <= unconditional(admin)
    dropped = linux_seccomp(seccomp=SecurityProfile("RuntimeDefault"), cap_drop=("ALL",))
    assert "chroot" not in unconditional(dropped)


def test_spec_unconfined_empty_and_the_config_switch() -> None:
    assert linux_seccomp(seccomp=SecurityProfile("Unconfined")) is None
    assert linux_seccomp() is None  # nothing asked: unconfined (the CRI, current CRI-O)
    on = {"seccomp_use_default_when_empty": True}
    assert linux_seccomp(on)["defaultAction"] == "SCMP_ACT_ERRNO"
    assert linux_seccomp(on, seccomp=SecurityProfile("Unconfined")) is None  # asked for


def test_spec_configured_default_profile(tmp_path: Path) -> None:
    path = tmp_path / "default.json"
    path.write_text(json.dumps(DOCKER_STYLE))
    profile = seccomp.load_file(str(path), "runtime.seccomp_profile")
    doc = linux_seccomp({"seccomp_profile": profile}, seccomp=SecurityProfile("RuntimeDefault"))
    assert doc["defaultAction"] == "SCMP_ACT_ALLOW" and rules_for(doc, "mkdir")


def test_spec_localhost(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(DOCKER_STYLE))
    doc = linux_seccomp(seccomp=SecurityProfile("Localhost", str(path)))
    assert doc["defaultAction"] == "SCMP_ACT_ALLOW" and rules_for(doc, "chmod")
    with pytest.raises(NotFound, match=f"{FIELD}: seccomp profile {tmp_path}/nope.json"):
        linux_seccomp(seccomp=SecurityProfile("Localhost", str(tmp_path / "nope.json")))
    with pytest.raises(InvalidArgument, match=FIELD):
        linux_seccomp(seccomp=SecurityProfile("Localhost", ""))


def test_spec_privileged_and_no_kernel_seccomp(tmp_path: Path) -> None:
    doc = build(spec=make_spec(sec={"privileged": True,
                                    "seccomp": SecurityProfile("RuntimeDefault")}),
                sandbox=make_sandbox(privileged=True))
    assert "seccomp" not in doc["linux"]
    off = {"seccomp_enabled": False}
    assert linux_seccomp(off, seccomp=SecurityProfile("RuntimeDefault")) is None
    with pytest.raises(FailedPrecondition, match="this kernel has no seccomp"):
        linux_seccomp(off, seccomp=SecurityProfile("Localhost", str(tmp_path / "p.json")))


def test_host_enabled_reads_this_kernel() -> None:
    status = Path("/proc/self/status").read_text()
    assert seccomp.host_enabled() == ("Seccomp:" in status)


# -- the CRI request ------------------------------------------------------------------------------


def seccomp_of(**fields: Any) -> SecurityProfile:
    cfg = pb.ContainerConfig(metadata=pb.ContainerMetadata(name="c"))
    sc = cfg.linux.security_context
    for key, value in fields.items():
        if isinstance(value, pb.SecurityProfile):
            getattr(sc, key).CopyFrom(value)
        else:
            setattr(sc, key, value)
    return spec_from_proto(cfg).security.seccomp


def test_cri_conversion() -> None:
    # RuntimeDefault is enum value 0: the message is set but has no bytes.
    rd = pb.SecurityProfile(profile_type=pb.SecurityProfile.RuntimeDefault)
    assert seccomp_of(seccomp=rd) == SecurityProfile("RuntimeDefault")
    loc = pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost, localhost_ref="/p.json")
    assert seccomp_of(seccomp=loc) == SecurityProfile("Localhost", "/p.json")
    assert seccomp_of(seccomp=pb.SecurityProfile(profile_type=pb.SecurityProfile.Unconfined)
                      ) == SecurityProfile("Unconfined")
    assert seccomp_of() == SecurityProfile()  # nothing asked
    assert seccomp_of(seccomp_profile_path="runtime/default").kind == "RuntimeDefault"
    assert seccomp_of(seccomp_profile_path="docker/default").kind == "RuntimeDefault"
    assert seccomp_of(seccomp_profile_path="unconfined").kind == "Unconfined"
    assert seccomp_of(seccomp_profile_path="localhost//var/lib/kubelet/seccomp/a.json"
                      ) == SecurityProfile("Localhost", "/var/lib/kubelet/seccomp/a.json")
    # the field wins over the deprecated string
    assert seccomp_of(seccomp=rd, seccomp_profile_path="unconfined").kind == "RuntimeDefault"
    with pytest.raises(InvalidArgument, match="seccomp_profile_path: unknown profile 'strict'"):
        seccomp_of(seccomp_profile_path="strict")


# -- configuration --------------------------------------------------------------------------------


def test_config_keys(tmp_path: Path) -> None:
    runtime = config.RuntimeConfig()
    assert runtime.seccomp_use_default_when_empty is False
    assert runtime.seccomp_profile == "" and runtime.apparmor_profile == "moorage-default"
    conf = tmp_path / "moorage.toml"
    conf.write_text('[runtime]\nseccomp_profile = "profiles/x.json"\n')
    with pytest.raises(config.ConfigError, match="runtime.seccomp_profile.*absolute path"):
        config.load(conf, tmp_path)
    conf.write_text('[runtime]\napparmor_profile = "two words"\n')
    with pytest.raises(config.ConfigError, match="runtime.apparmor_profile"):
        config.load(conf, tmp_path)


def test_daemon_confinement_options(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(DOCKER_STYLE))
    got = daemon._confinement(config.RuntimeConfig(seccomp_profile=str(path),
                                                   seccomp_use_default_when_empty=True))
    assert got["seccomp_profile"].source == f"runtime.seccomp_profile: seccomp profile {path}"
    assert got["seccomp_use_default_when_empty"] is True
    assert daemon._confinement(config.RuntimeConfig())["seccomp_profile"] is None
    with pytest.raises(NotFound, match="runtime.seccomp_profile: seccomp profile .* does not"):
        daemon._confinement(config.RuntimeConfig(seccomp_profile=str(tmp_path / "gone.json")))
