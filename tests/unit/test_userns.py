"""User namespaces without root: the rules for mappings and modes, the pinner's arguments and
refusals, the container spec, and the probe's answers that need no privilege."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moorage.container.model import Mount
from moorage.cri.v1 import api_pb2 as pb
from moorage.errors import FailedPrecondition, InvalidArgument
from moorage.sandbox import userns
from moorage.sandbox.model import Mode, UserNamespace
from moorage.sandbox.namespaces import PinnedNamespaces, UserMappings, infra_argv, pin_argv
from moorage.sandbox.pinns import mappings_problem, parse_mapping
from moorage.server.sandbox import spec_from_proto, userns_from_proto, userns_to_proto
from moorage.util.idmap import IdMapping, MappedUserNamespace, map_id
from tests.unit.test_spec_document import build, make_sandbox, make_spec

H = 65536 * 5
POD_MAP = (IdMapping(0, H, 65536),)
POD = UserNamespace(Mode.POD, POD_MAP, POD_MAP)
SRC = str(Path(userns.__file__).resolve().parents[2])


# -- mappings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mappings", "problem"),
    [
        ([(0, H, 65536)], None),
        ([(0, H, 1), (1, H + 10, 100)], None),
        ([], "uids: at least one mapping is required"),
        ([(0, H, 0)], "uids[0].length must be positive"),
        ([(0, 2**32 - 2, 2)], "uids[0]: the range"),
        ([(2**32 - 2, 0, 2)], "uids[0]: the range"),
        ([(0, H, 10), (5, H + 100, 10)], "uids[1].container_id overlaps uids[0]"),
        ([(0, H, 10), (10, H + 5, 10)], "uids[1].host_id overlaps uids[0]"),
        ([(1, H, 10)], "no mapping covers container id 0"),
        ([(i, H + i, 1) for i in range(341)], "341 mappings, at most 340"),
    ],
)
def test_mappings_problem(mappings: list[tuple[int, int, int]], problem: str | None) -> None:
    got = mappings_problem("uids", mappings)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got


@pytest.mark.parametrize("text", ["0:1:2", "10:655360:65536"])
def test_parse_mapping(text: str) -> None:
    assert parse_mapping(text) == tuple(int(p) for p in text.split(":"))


@pytest.mark.parametrize("text", ["", "0:1", "0:1:2:3", "a:1:2", "-1:1:2", "0:1:²"])
def test_parse_mapping_refuses(text: str) -> None:
    assert parse_mapping(text) is None


def test_map_id_and_host_owner() -> None:
    maps = (IdMapping(0, H, 1), IdMapping(1, 2 * H, 999))
    assert [map_id(maps, i) for i in (0, 1, 999, 1000)] == [H, 2 * H, 2 * H + 998, None]
    ns = MappedUserNamespace(-1, maps, POD_MAP)
    assert ns.host_owner(5, 7) == (2 * H + 4, H + 7)
    assert ns.host_owner(5000, 70000) == (H, H)  # unmapped ids: the pod's root


# -- modes ------------------------------------------------------------------------------------


def _check(u: UserNamespace, **host: bool) -> None:
    userns.validate(u, host_network=host.get("host_network", False),
                    host_pid=host.get("host_pid", False), host_ipc=host.get("host_ipc", False))


def test_validate_accepts_node_and_pod() -> None:
    _check(UserNamespace())
    _check(POD)


@pytest.mark.parametrize(
    ("u", "host", "match"),
    [
        (UserNamespace(Mode.CONTAINER), {}, r"userns_options\.mode: CONTAINER is not supported"),
        (UserNamespace(Mode.TARGET), {}, r"userns_options\.mode: TARGET"),
        (UserNamespace(Mode.NODE, POD_MAP, ()), {}, "mode is NODE"),
        (UserNamespace(Mode.POD, POD_MAP, ()), {}, r"userns_options\.gids: at least one"),
        (POD, {"host_network": True}, "host's network namespace"),
        (POD, {"host_pid": True}, "host's pid namespace"),
        (POD, {"host_ipc": True}, "host's ipc namespace"),
    ],
)
def test_validate_refuses(u: UserNamespace, host: dict[str, bool], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        _check(u, **host)


def test_same() -> None:
    assert userns.same(POD, POD)
    assert userns.same(UserNamespace(), UserNamespace())
    assert not userns.same(UserNamespace(), POD)
    assert not userns.same(POD, UserNamespace())
    other = (IdMapping(0, 2 * H, 65536),)
    assert not userns.same(UserNamespace(Mode.POD, other, other), POD)


def test_check_support() -> None:
    userns.check_support(None)
    with pytest.raises(FailedPrecondition, match="userns_options: user namespaces are not"):
        userns.check_support("no idmapped mounts")


def test_search_problem(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    inner = locked / "inner"
    inner.mkdir(parents=True)
    os.chmod(tmp_path, 0o711)
    locked.chmod(0o700)
    problem = userns._search_problem([inner])
    assert problem is not None and str(locked) in problem and "searched by others" in problem
    locked.chmod(0o711)
    # Now only an ancestor outside the test's reach (pytest's own 0700 dir) may be named.
    again = userns._search_problem([inner / "missing"])
    assert again is None or f"{locked} (mode" not in again


# -- protobuf ----------------------------------------------------------------------------------


def test_proto_round_trip_and_default() -> None:
    req = pb.RunPodSandboxRequest(config=pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="p", namespace="n", uid="u")))
    assert spec_from_proto(req).userns == UserNamespace()  # no options: the host's
    ns = req.config.linux.security_context.namespace_options
    ns.userns_options.CopyFrom(pb.UserNamespace(
        mode=pb.POD, uids=[pb.IDMapping(host_id=H, container_id=0, length=65536)],
        gids=[pb.IDMapping(host_id=H, container_id=0, length=65536)]))
    spec = spec_from_proto(req)
    assert spec.userns == POD
    assert userns_to_proto(spec.userns) == ns.userns_options
    ns.userns_options.mode = 9  # type: ignore[assignment]
    with pytest.raises(InvalidArgument, match=r"userns_options\.mode: unknown"):
        userns_from_proto(ns, "config.x.userns_options")


# -- the pinner --------------------------------------------------------------------------------


def test_pin_and_infra_arguments() -> None:
    argv = pin_argv(Path("/run/ns"), "abc", net=True, ipc=False, uts=True,
                    user=UserMappings(uids=POD_MAP, gids=(IdMapping(0, H, 1),
                                                          IdMapping(1, H + 1, 9))))
    assert argv == ["--dir", "/run/ns", "--id", "abc", "--user",
                    "--uid-map", f"0:{H}:65536", "--gid-map", f"0:{H}:1",
                    "--gid-map", f"1:{H + 1}:9", "--net", "--uts"]
    pinned = PinnedNamespaces(net="/n", user="/u")
    assert pinned.paths() == ["/n", "/u"]
    assert infra_argv(pinned, [], ["/bin/pause"]) == [
        "infra", "--user-ns", "/u", "--net-ns", "/n", "--", "/bin/pause"]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--user", "--uid-map", "0:1:10"], "gids: at least one mapping"),
        (["--user", "--uid-map", "0-1-10", "--gid-map", "0:1:10"], "is not CONTAINER:HOST"),
        (["--user", "--uid-map", "1:1:10", "--gid-map", "0:1:10"], "container id 0"),
        (["--net", "--uid-map", "0:1:10"], "need a new user namespace"),
    ],
)
def test_helper_refuses_bad_mappings(tmp_path: Path, args: list[str], match: str) -> None:
    """Refused before anything is changed: safe without root."""
    done = subprocess.run(
        [sys.executable, "-P", "-S", "-m", "moorage.sandbox.pinns",
         "--dir", str(tmp_path), "--id", "x", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": SRC},
    )
    assert done.returncode == 2, done.stderr
    assert match in done.stdout
    assert not list(tmp_path.iterdir())


# -- the container spec ----------------------------------------------------------------------


def test_spec_joins_the_pod_user_namespace() -> None:
    sandbox = make_sandbox(user_ns="/run/moorage/ns/user/sb1", uid_mappings=POD_MAP,
                           gid_mappings=(IdMapping(0, H + 1, 65536),))
    doc = build(sandbox=sandbox)
    linux = doc["linux"]
    assert linux["namespaces"][0] == {"type": "user", "path": "/run/moorage/ns/user/sb1"}
    assert {"type": "network", "path": "/run/moorage/ns/net/sb1"} in linux["namespaces"]
    assert linux["uidMappings"] == [{"containerID": 0, "hostID": H, "size": 65536}]
    assert linux["gidMappings"] == [{"containerID": 0, "hostID": H + 1, "size": 65536}]


def test_spec_without_user_namespace_has_no_mappings() -> None:
    linux = build()["linux"]
    assert "uidMappings" not in linux and "gidMappings" not in linux
    assert all(n["type"] != "user" for n in linux["namespaces"])


def test_spec_refuses_an_unprepared_idmapped_mount(tmp_path: Path) -> None:
    mount = Mount(container_path="/v", host_path=str(tmp_path), uid_mappings=POD_MAP,
                  gid_mappings=POD_MAP)
    with pytest.raises(FailedPrecondition, match=r"config\.mounts\[0\]\.uidMappings"):
        build(spec=make_spec(mounts=(mount,)))
