"""Who a container runs as: CRI run_as_* and the image's User against the image's
/etc/passwd and /etc/group, read inside the rootfs only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from moorage.container.model import ContainerSpec, ImageView, SecurityContext
from moorage.container.users import (
    GroupEntry,
    PasswdEntry,
    ResolvedUser,
    parse_group,
    parse_passwd,
    read_in_root,
    resolve_user,
)
from moorage.errors import InvalidArgument

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
# a comment
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
+nisuser::::::
broken line
bad:x:notanumber:1::/:/bin/sh
app:x:1000:1000:App User:/home/app:/bin/sh
nohome:x:1001:1001
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
"""

GROUP = """\
root:x:0:
daemon:x:1:
staff:x:50:app,other
app:x:1000:
wheel:x:10: root , app
audio:x:29:
nogroup:x:65534:
"""


def make_rootfs(base: Path, passwd: str | None = PASSWD, group: str | None = GROUP) -> Path:
    rootfs = base / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    if passwd is not None:
        (rootfs / "etc" / "passwd").write_text(passwd)
    if group is not None:
        (rootfs / "etc" / "group").write_text(group)
    return rootfs


def spec(**sec: Any) -> ContainerSpec:
    return ContainerSpec(name="c", attempt=0, image="img", security=SecurityContext(**sec))


def image(user: str | None = None) -> ImageView:
    config: dict[str, Any] = {"Cmd": ["sh"]}
    if user is not None:
        config["User"] = user
    return ImageView(id="i", ref="i", name="img:1", config=config, layers=())


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    return make_rootfs(tmp_path)


# -- parsing --------------------------------------------------------------------------------------


def test_parse_passwd() -> None:
    entries = parse_passwd(PASSWD.encode())
    assert [e.name for e in entries] == ["root", "daemon", "app", "nohome", "nobody"]
    assert entries[2] == PasswdEntry("app", 1000, 1000, "/home/app")
    assert entries[3] == PasswdEntry("nohome", 1001, 1001, "")


def test_parse_group() -> None:
    entries = parse_group(GROUP.encode())
    assert entries[2] == GroupEntry("staff", 50, ("app", "other"))
    assert entries[4] == GroupEntry("wheel", 10, ("root", "app"))
    assert entries[0] == GroupEntry("root", 0, ())


# -- resolution -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        (None, ResolvedUser(0, 0, (0, 10), "root", "/root")),
        ("", ResolvedUser(0, 0, (0, 10), "root", "/root")),
        ("1000", ResolvedUser(1000, 1000, (10, 50, 1000), "app", "/home/app")),
        ("app", ResolvedUser(1000, 1000, (10, 50, 1000), "app", "/home/app")),
        ("app:staff", ResolvedUser(1000, 50, (10, 50), "app", "/home/app")),
        ("app:1234", ResolvedUser(1000, 1234, (10, 50, 1234), "app", "/home/app")),
        ("1000:audio", ResolvedUser(1000, 29, (10, 29, 50), "app", "/home/app")),
        ("0:staff", ResolvedUser(0, 50, (10, 50), "root", "/root")),
        # a uid not in /etc/passwd: gid 0, no name, home /
        ("4242", ResolvedUser(4242, 0, (0,), None, "/")),
        ("4242:4243", ResolvedUser(4242, 4243, (4243,), None, "/")),
        ("nohome", ResolvedUser(1001, 1001, (1001,), "nohome", "/")),
        (" daemon ", ResolvedUser(1, 1, (1,), "daemon", "/usr/sbin")),
    ],
)
def test_image_user(rootfs: Path, user: str | None, expected: ResolvedUser) -> None:
    assert resolve_user(rootfs, spec(), image(user)) == expected


@pytest.mark.parametrize(
    ("user", "match"),
    [
        ("bob", r"config User 'bob': user 'bob' not found in the image's /etc/passwd"),
        ("app:nosuch", r"group 'nosuch' not found in the image's /etc/group"),
        ("99999999999", "not a valid uid"),
    ],
)
def test_image_user_unknown(rootfs: Path, user: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        resolve_user(rootfs, spec(), image(user))


@pytest.mark.parametrize(
    ("sec", "expected"),
    [
        # run_as_user: gid from /etc/passwd when listed, else 0; the image's User is ignored
        ({"run_as_user": 1000}, ResolvedUser(1000, 1000, (10, 50, 1000), "app", "/home/app")),
        ({"run_as_user": 5000}, ResolvedUser(5000, 0, (0,), None, "/")),
        ({"run_as_user": 0}, ResolvedUser(0, 0, (0, 10), "root", "/root")),
        (
            {"run_as_user": 1000, "run_as_group": 3000},
            ResolvedUser(1000, 3000, (10, 50, 3000), "app", "/home/app"),
        ),
        ({"run_as_username": "app"}, ResolvedUser(1000, 1000, (10, 50, 1000), "app", "/home/app")),
        (
            {"run_as_username": "app", "run_as_group": 7},
            ResolvedUser(1000, 7, (7, 10, 50), "app", "/home/app"),
        ),
        # supplemental groups: merged with /etc/group membership, or strictly the CRI ones
        (
            {"run_as_user": 1000, "supplemental_groups": (2000, 50)},
            ResolvedUser(1000, 1000, (10, 50, 1000, 2000), "app", "/home/app"),
        ),
        (
            {
                "run_as_user": 1000,
                "supplemental_groups": (2000,),
                "supplemental_groups_policy": "strict",
            },
            ResolvedUser(1000, 1000, (1000, 2000), "app", "/home/app"),
        ),
        (
            {"run_as_user": 5000, "supplemental_groups": (2000,)},
            ResolvedUser(5000, 0, (0, 2000), None, "/"),
        ),
    ],
)
def test_cri_user(rootfs: Path, sec: dict[str, Any], expected: ResolvedUser) -> None:
    assert resolve_user(rootfs, spec(**sec), image("nobody")) == expected


def test_strict_with_image_user(rootfs: Path) -> None:
    got = resolve_user(rootfs, spec(supplemental_groups_policy="strict"), image("app"))
    assert got.additional_gids == (1000,)


@pytest.mark.parametrize(
    ("sec", "match"),
    [
        (
            {"run_as_username": "bob"},
            r"run_as_username: user 'bob' not found in the image's /etc/passwd",
        ),
        ({"run_as_user": 1, "run_as_username": "app"}, "only one may be"),
        ({"run_as_group": 5}, "run_as_group: set without run_as_user or run_as_username"),
        ({"run_as_user": -1}, r"run_as_user: -1 is not a valid id"),
        ({"run_as_user": 0, "run_as_group": 2**32}, "run_as_group"),
        ({"supplemental_groups": (-3,)}, "supplemental_groups"),
    ],
)
def test_cri_user_refusals(rootfs: Path, sec: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match) as e:
        resolve_user(rootfs, spec(**sec), image())
    assert e.value.message.startswith("config.linux.security_context")


def test_no_passwd_or_group(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path, passwd=None, group=None)
    assert resolve_user(rootfs, spec(), image()) == ResolvedUser(0, 0, (0,), None, "/")
    assert resolve_user(rootfs, spec(), image("1000:1000")) == ResolvedUser(
        1000, 1000, (1000,), None, "/"
    )
    with pytest.raises(InvalidArgument, match="not found"):
        resolve_user(rootfs, spec(), image("app"))
    # no /etc at all
    bare = tmp_path / "bare"
    bare.mkdir()
    assert resolve_user(bare, spec(run_as_user=7), image()) == ResolvedUser(7, 0, (0,), None, "/")


def test_record_round_trip() -> None:
    user = ResolvedUser(1000, 50, (10, 50), "app", "/home/app")
    assert ResolvedUser.from_record(user.record()) == user


# -- the files are the rootfs's, never the host's --------------------------------------------------


def test_passwd_symlinked_to_host_file(tmp_path: Path) -> None:
    """An absolute link to /etc/passwd means the rootfs's own /etc/passwd: a loop here, and
    never the host's file (which has a "daemon" user)."""
    assert any(line.startswith("daemon:") for line in Path("/etc/passwd").read_text().splitlines())
    rootfs = make_rootfs(tmp_path, passwd=None)
    (rootfs / "etc" / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(InvalidArgument, match="/etc/passwd: Too many levels of symbolic links"):
        resolve_user(rootfs, spec(run_as_username="daemon"), image())
    # a relative escape is clamped at the rootfs the same way
    (rootfs / "etc" / "passwd").unlink()
    (rootfs / "etc" / "passwd").symlink_to("../../../../../../etc/passwd")
    with pytest.raises(InvalidArgument, match="symbolic links"):
        resolve_user(rootfs, spec(run_as_username="daemon"), image())


def test_etc_symlinked_to_host_etc(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    (rootfs / "etc").symlink_to("/etc")  # inside the rootfs: <rootfs>/etc itself again
    with pytest.raises(InvalidArgument, match="symbolic links"):
        resolve_user(rootfs, spec(run_as_username="daemon"), image())


def test_links_resolved_inside_the_rootfs(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "usr" / "share" / "base").mkdir(parents=True)
    (rootfs / "usr" / "share" / "base" / "passwd").write_text(PASSWD)
    (rootfs / "usr" / "share" / "base" / "group").write_text(GROUP)
    # /etc -> usr/share/base (relative); /etc/group reached through an absolute link
    (rootfs / "etc").symlink_to("usr/share/base")
    (rootfs / "usr" / "share" / "base" / "group").rename(rootfs / "usr" / "share" / "group")
    (rootfs / "usr" / "share" / "base" / "group").symlink_to("/usr/share/group")
    got = resolve_user(rootfs, spec(), image("app:staff"))
    assert got == ResolvedUser(1000, 50, (10, 50), "app", "/home/app")
    # a host path with the same name is not consulted
    assert read_in_root(rootfs, "/usr/share/base/passwd") == PASSWD.encode()
    assert read_in_root(rootfs, "/../../etc/passwd") == PASSWD.encode()


def test_dangling_link_is_missing(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path, passwd=None)
    (rootfs / "etc" / "passwd").symlink_to("/nonexistent/passwd")
    assert resolve_user(rootfs, spec(run_as_user=3), image()) == ResolvedUser(3, 0, (0,), None, "/")


def test_not_a_regular_file(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path, passwd=None)
    os.mkfifo(rootfs / "etc" / "passwd")  # opening it for reading would block
    with pytest.raises(InvalidArgument, match="/etc/passwd: not a regular file"):
        resolve_user(rootfs, spec(), image())
    os.unlink(rootfs / "etc" / "passwd")
    (rootfs / "etc" / "passwd").mkdir()
    with pytest.raises(InvalidArgument, match="not a regular file"):
        resolve_user(rootfs, spec(), image())


def test_file_too_large(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path)
    assert read_in_root(rootfs, "/etc/passwd", limit=10_000) == PASSWD.encode()
    with pytest.raises(InvalidArgument, match="larger than 10 bytes"):
        read_in_root(rootfs, "/etc/passwd", limit=10)


def test_file_where_a_directory_should_be(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    (rootfs / "etc").write_text("not a directory")
    assert read_in_root(rootfs, "/etc/passwd") is None
