"""AppArmor (profile choice with AppArmor enabled and not, our default profile's text, the
host files read) and SELinux options (ignored with a log line). This host has no AppArmor:
the enabled path is driven by injecting the host facts (``apparmor_enabled`` and the
loaded profiles) as SpecOptions allow."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from moorage import log
from moorage.container import apparmor
from moorage.container.model import SecurityProfile
from moorage.cri.v1 import api_pb2 as pb
from moorage.errors import FailedPrecondition, InvalidArgument
from moorage.server.container import spec_from_proto
from tests.unit.test_spec_document import build, make_sandbox, make_spec, opts

FIELD = "config.linux.security_context.apparmor"
LOADED = frozenset({apparmor.DEFAULT_PROFILE, "k8s-nginx", "docker-default"})


def choose(kind: str = "", ref: str = "", *, enabled: bool = True, default: str =
           apparmor.DEFAULT_PROFILE, loaded: frozenset[str] = LOADED) -> str | None:
    return apparmor.process_profile(SecurityProfile(kind, ref), default=default,  # type: ignore[arg-type]
                                    host_enabled=enabled, loaded=loaded, field=FIELD)


@pytest.mark.parametrize(("kind", "ref", "expected"), [
    ("", "", "moorage-default"),  # nothing asked: the default, as CRI-O
    ("RuntimeDefault", "", "moorage-default"),
    ("Unconfined", "", "unconfined"),
    ("Localhost", "k8s-nginx", "k8s-nginx"),
    ("Localhost", "localhost/k8s-nginx", "k8s-nginx"),
    ("Localhost", apparmor.DEFAULT_PROFILE, apparmor.DEFAULT_PROFILE),
])
def test_enabled_host(kind: str, ref: str, expected: str) -> None:
    assert choose(kind, ref) == expected


def test_enabled_host_errors() -> None:
    with pytest.raises(FailedPrecondition, match=f"{FIELD}: AppArmor profile 'k8s-missing' "
                       r"\(requested\) is not loaded"):
        choose("Localhost", "k8s-missing")
    with pytest.raises(InvalidArgument, match=f"{FIELD}.localhost_ref: Localhost needs a"):
        choose("Localhost", "localhost/")


def test_configured_default() -> None:
    assert choose("RuntimeDefault", default="docker-default") == "docker-default"
    assert choose("", default="unconfined") == "unconfined"
    with pytest.raises(FailedPrecondition, match="'custom' .the configured default. is not"):
        choose("RuntimeDefault", default="custom")


@pytest.mark.parametrize("kind", ["", "RuntimeDefault", "Unconfined"])
def test_host_without_apparmor(kind: str) -> None:
    assert choose(kind, enabled=False) is None  # CRI-O: no profile


def test_localhost_on_a_host_without_apparmor() -> None:
    with pytest.raises(FailedPrecondition, match=f"{FIELD}: AppArmor profile 'k8s-nginx' "
                       "requested, but AppArmor is not enabled on this host"):
        choose("Localhost", "k8s-nginx", enabled=False)


def test_spec_document() -> None:
    on = opts(apparmor_enabled=True, apparmor_loaded=LOADED)
    doc = build(spec=make_spec(sec={"apparmor": SecurityProfile("Localhost", "k8s-nginx")}),
                options=on)
    assert doc["process"]["apparmorProfile"] == "k8s-nginx"
    assert build(options=on)["process"]["apparmorProfile"] == "moorage-default"
    assert build(options=opts(apparmor_enabled=True, apparmor_loaded=LOADED,
                              apparmor_profile="unconfined")
                 )["process"]["apparmorProfile"] == "unconfined"
    privileged = build(spec=make_spec(sec={"privileged": True}),
                       sandbox=make_sandbox(privileged=True), options=on)
    assert "apparmorProfile" not in privileged["process"]  # privileged: none (CRI-O)


def test_default_profile_text() -> None:
    text = apparmor.render_default("moorage-test")
    assert "@NAME@" not in text
    assert re.search(r"^profile moorage-test flags=\(attach_disconnected,mediate_deleted\) \{$",
                     text, re.M)
    assert "signal (send,receive) peer=moorage-test," in text
    assert "ptrace (trace,read,tracedby,readby) peer=moorage-test," in text
    for rule in ("deny mount,", "deny @{PROC}/sysrq-trigger rwklx,", "deny @{PROC}/kcore rwklx,",
                 "deny /sys/firmware/** rwklx,", "deny /sys/kernel/security/** rwklx,"):
        assert rule in text
    body = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")
                     or ln.startswith("#include"))
    assert body.count("{") - body.count("@{") == body.count("}") - body.count("@{")


def test_host_files(tmp_path: Path) -> None:
    enabled = tmp_path / "enabled"
    enabled.write_text("Y\n")
    assert apparmor.enabled(str(enabled))
    enabled.write_text("N\n")
    assert not apparmor.enabled(str(enabled))
    assert not apparmor.enabled(str(tmp_path / "absent"))
    profiles = tmp_path / "profiles"
    profiles.write_text("moorage-default (enforce)\nk8s nginx (complain)\n/usr/bin/man (enforce)\n")
    assert apparmor.loaded_profiles(str(profiles)) == {"moorage-default", "k8s nginx",
                                                       "/usr/bin/man"}
    assert apparmor.loaded_profiles(str(tmp_path / "absent")) == frozenset()
    # this host: what the kernel says
    assert apparmor.enabled() == (Path(apparmor.ENABLED_FILE).exists()
                                  and Path(apparmor.ENABLED_FILE).read_text().strip() == "Y")


def security_of(**fields: Any) -> Any:
    cfg = pb.ContainerConfig(metadata=pb.ContainerMetadata(name="c"))
    sc = cfg.linux.security_context
    for key, value in fields.items():
        if hasattr(value, "CopyFrom"):
            getattr(sc, key).CopyFrom(value)
        else:
            setattr(sc, key, value)
    return spec_from_proto(cfg).security


def test_cri_conversion() -> None:
    rd = pb.SecurityProfile(profile_type=pb.SecurityProfile.RuntimeDefault)
    assert security_of(apparmor=rd).apparmor == SecurityProfile("RuntimeDefault")
    loc = pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost, localhost_ref="k8s-a")
    assert security_of(apparmor=loc, apparmor_profile="localhost/k8s-a"
                       ).apparmor == SecurityProfile("Localhost", "k8s-a")
    assert security_of().apparmor == SecurityProfile()
    assert security_of(apparmor_profile="runtime/default").apparmor.kind == "RuntimeDefault"
    assert security_of(apparmor_profile="unconfined").apparmor.kind == "Unconfined"
    assert security_of(apparmor_profile="k8s-b").apparmor == SecurityProfile("Localhost", "k8s-b")
    bad = pb.SecurityProfile(profile_type=7)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"apparmor.profile_type: unknown value 7"):
        security_of(apparmor=bad)
    se = pb.SELinuxOption(user="system_u", role="system_r", type="container_t", level="s0:c1,c2")
    assert security_of(selinux_options=se).selinux_options == (
        "system_u", "system_r", "container_t", "s0:c1,c2")
    assert security_of().selinux_options == ()


# -- SELinux ---------------------------------------------------------------------------------------


def test_selinux_options_ignored_with_a_log_line() -> None:
    sec = {"selinux_options": ("system_u", "system_r", "container_t", "s0:c1,c2")}
    with log.capture() as logs:
        doc = build(spec=make_spec(sec=sec), options=opts(selinux_enabled=False))
    assert "selinuxLabel" not in doc["process"] and "mountLabel" not in doc["linux"]
    [entry] = [e for e in logs if e["event"] == "container.selinux_options_ignored"]
    assert entry["container_id"] == "c0ffee" and entry["container"] == "app"
    assert entry["options"] == "system_u:system_r:container_t:s0:c1,c2"
    assert entry["reason"] == "SELinux is disabled on this host"
    with log.capture() as logs:
        build()  # no options: nothing said
        build(spec=make_spec(sec={"selinux_options": ("", "", "", "")}))
    assert not [e for e in logs if e["event"] == "container.selinux_options_ignored"]
