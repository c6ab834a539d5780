"""process.args, env and cwd of the OCI spec: Kubernetes' command/args rules and the
environment merge."""

from __future__ import annotations

from typing import Any

import pytest

from moorage.container.spec import process_args
from moorage.container.users import ResolvedUser
from moorage.errors import InvalidArgument
from tests.unit.test_spec_document import build, make_image, make_sandbox, make_spec

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# -- args -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entrypoint", "cmd", "command", "args", "expected"),
    [
        # image only
        (["/ep"], ["c1", "c2"], (), (), ["/ep", "c1", "c2"]),
        (None, ["sh", "-c", "x"], (), (), ["sh", "-c", "x"]),
        (["/ep", "-v"], None, (), (), ["/ep", "-v"]),
        # args replace Cmd, the Entrypoint stays
        (["/ep"], ["c1"], (), ("a1",), ["/ep", "a1"]),
        (None, ["c1"], (), ("a1", "a2"), ["a1", "a2"]),
        # command replaces the Entrypoint, and the image's Cmd is then ignored
        (["/ep"], ["c1"], ("/bin/cmd",), (), ["/bin/cmd"]),
        (["/ep"], ["c1"], ("/bin/cmd", "x"), ("a1",), ["/bin/cmd", "x", "a1"]),
        (None, None, ("/bin/cmd",), ("a1",), ["/bin/cmd", "a1"]),
        # an Entrypoint of [""] is none (containerd)
        ([""], ["c1"], (), (), ["c1"]),
    ],
)
def test_args(
    entrypoint: list[str] | None,
    cmd: list[str] | None,
    command: tuple[str, ...],
    args: tuple[str, ...],
    expected: list[str],
) -> None:
    image = make_image(Entrypoint=entrypoint, Cmd=cmd)
    spec = make_spec(command=command, args=args)
    assert process_args(spec, image) == expected
    assert build(spec=spec, image=image)["process"]["args"] == expected


@pytest.mark.parametrize(
    ("entrypoint", "cmd"),
    [(None, None), ([], []), ([""], None)],
)
def test_no_command(entrypoint: Any, cmd: Any) -> None:
    with pytest.raises(InvalidArgument, match="no command specified"):
        process_args(make_spec(), make_image(Entrypoint=entrypoint, Cmd=cmd))


def test_bad_image_cmd_and_nul() -> None:
    with pytest.raises(InvalidArgument, match="config Cmd is not a list of strings"):
        process_args(make_spec(), make_image(Cmd="sh -c x"))
    with pytest.raises(InvalidArgument, match="NUL"):
        process_args(make_spec(command=("a\0b",)), make_image())


# -- env ------------------------------------------------------------------------------------------


def env_of(**kw: Any) -> list[str]:
    env: list[str] = build(**kw)["process"]["env"]
    return env


def test_env_defaults() -> None:
    assert env_of() == [DEFAULT_PATH, "HOSTNAME=web-0", "HOME=/root"]


def test_env_merge_order_and_override() -> None:
    image = make_image(Env=["PATH=/img/bin", "A=image", "B=image", "NOEQUALS", "=x"])
    spec = make_spec(env=(("B", b"cri"), ("C", b"cri"), ("A", b"cri-a"), ("C", b"last")))
    env = env_of(spec=spec, image=image, extra_env={"D": "extra", "B": "extra-b"})
    # a key keeps the place it first had, with its last value; broken image entries go
    assert env == [
        "PATH=/img/bin",
        "HOSTNAME=web-0",
        "A=cri-a",
        "B=extra-b",
        "C=last",
        "D=extra",
        "HOME=/root",
    ]


def test_env_home_hostname_term() -> None:
    user = ResolvedUser(
        uid=1000, gid=1000, additional_gids=(1000,), username="app", home="/home/app"
    )
    env = env_of(spec=make_spec(tty=True), user=user, sandbox=make_sandbox(hostname="h1"))
    assert env == [DEFAULT_PATH, "HOSTNAME=h1", "TERM=xterm", "HOME=/home/app"]
    # set by the image or the request: kept
    image = make_image(Env=["HOME=/data", "TERM=vt100", "HOSTNAME=img"])
    env = env_of(spec=make_spec(tty=True), user=user, image=image)
    assert env == [DEFAULT_PATH, "HOSTNAME=img", "TERM=vt100", "HOME=/data"]


def test_env_values_are_text() -> None:
    spec = make_spec(env=(("GREETING", "héllo".encode()), ("EMPTY", b"")))
    assert "GREETING=héllo" in env_of(spec=spec)
    assert "EMPTY=" in env_of(spec=spec)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("BIN", b"\xff\xfe", r"config.envs\[0\].value: the value of 'BIN' is not UTF-8"),
        ("", b"x", r"config.envs\[0\].key"),
        ("A=B", b"x", r"config.envs\[0\].key"),
        ("NUL", b"a\0b", "NUL"),
    ],
)
def test_env_refusals(key: str, value: bytes, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        build(spec=make_spec(env=((key, value),)))


# -- cwd ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("working_dir", "image_wd", "expected"),
    [
        ("", None, "/"),
        ("", "", "/"),
        ("", "/srv/app", "/srv/app"),
        ("", "relative/dir", "/relative/dir"),
        ("/work", "/srv/app", "/work"),
        ("/work/../tmp/", None, "/tmp"),
    ],
)
def test_cwd(working_dir: str, image_wd: str | None, expected: str) -> None:
    doc = build(spec=make_spec(working_dir=working_dir), image=make_image(WorkingDir=image_wd))
    assert doc["process"]["cwd"] == expected


def test_cwd_must_be_absolute() -> None:
    with pytest.raises(InvalidArgument, match="config.working_dir"):
        build(spec=make_spec(working_dir="work"))


def test_terminal_and_no_new_privs() -> None:
    p = build(spec=make_spec(tty=True, sec={"no_new_privs": True}))["process"]
    assert p["terminal"] is True
    assert p["noNewPrivileges"] is True
