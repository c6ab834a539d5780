"""CRI AuthConfig to registry credentials (moorage.image.credentials)."""

from __future__ import annotations

import base64

import pytest

from moorage.errors import InvalidArgument
from moorage.image.credentials import Credentials, decode_auth, from_auth_config


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def auth_config(
    username: str = "",
    password: str = "",
    auth: str = "",
    server_address: str = "",
    identity_token: str = "",
    registry_token: str = "",
) -> Credentials | None:
    return from_auth_config(
        username, password, auth, server_address, identity_token, registry_token
    )


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, None),
        ({"server_address": "quay.io"}, None),
        ({"username": "alice", "password": "s3cret"}, Credentials("alice", "s3cret")),
        ({"username": "alice"}, Credentials("alice", "")),
        ({"auth": b64("alice:s3cret")}, Credentials("alice", "s3cret")),
        ({"auth": b64("alice:pa:ss:word")}, Credentials("alice", "pa:ss:word")),
        ({"auth": b64("alice:")}, Credentials("alice", "")),
        ({"auth": b64(":")}, None),
        ({"auth": b64(":token-only")}, Credentials("", "token-only")),
        ({"auth": b64("alice:s3cret\x00\x00")}, Credentials("alice", "s3cret")),
        ({"auth": b64("élise:mot-de-passe")}, Credentials("élise", "mot-de-passe")),
        # Unpadded base64 and line breaks from wrapped output are tolerated.
        ({"auth": b64("alice:s3cret1").rstrip("=")}, Credentials("alice", "s3cret1")),
        ({"auth": " " + b64("alice:s3cret") + "\n"}, Credentials("alice", "s3cret")),
        (
            {"auth": b64("a:" + "x" * 80)[:40] + "\n" + b64("a:" + "x" * 80)[40:]},
            Credentials("a", "x" * 80),
        ),
        # auth wins over username and password.
        (
            {"username": "bob", "password": "other", "auth": b64("alice:s3cret")},
            Credentials("alice", "s3cret"),
        ),
        ({"identity_token": "refresh"}, Credentials(identity_token="refresh")),
        ({"registry_token": "bearer"}, Credentials(registry_token="bearer")),
        (
            {"username": "alice", "password": "pw", "identity_token": "it", "registry_token": "rt"},
            Credentials("alice", "pw", "it", "rt"),
        ),
        (
            {"auth": b64("alice:pw"), "identity_token": "it", "server_address": "quay.io"},
            Credentials("alice", "pw", "it"),
        ),
    ],
)
def test_from_auth_config(fields: dict[str, str], expected: Credentials | None) -> None:
    assert auth_config(**fields) == expected


@pytest.mark.parametrize(
    ("auth", "why"),
    [
        ("not base64!", "not valid base64"),
        ("YWxpY2U6c2VjcmV0=x", "not valid base64"),
        ("a", "not valid base64"),
        ("é", "non-ASCII"),
        (b64("no-colon-here"), 'not "username:password"'),
        (b64(b"\xff\xfe:\x80"), "not UTF-8"),
    ],
)
def test_malformed_auth(auth: str, why: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        auth_config(username="alice", password="pw", auth=auth)
    assert info.value.message.startswith("auth.auth: ")
    assert why in info.value.message


def test_error_does_not_show_the_secret() -> None:
    secret = "hunter2-very-secret"
    with pytest.raises(InvalidArgument) as info:
        auth_config(auth=b64(secret))
    assert secret not in info.value.message
    assert secret not in str(info.value)
    assert secret not in repr(info.value)
    assert info.value.__cause__ is None or secret not in str(info.value.__cause__)


def test_decode_auth() -> None:
    assert decode_auth(b64("u:p")) == ("u", "p")


def test_repr_masks_secrets() -> None:
    credentials = Credentials("alice", "s3cret", "id-token-value", "registry-token-value")
    for text in (repr(credentials), str(credentials), f"{credentials}", repr([credentials])):
        assert "alice" in text
        for secret in ("s3cret", "id-token-value", "registry-token-value"):
            assert secret not in text
        assert "<redacted>" in text
    assert repr(Credentials("alice")) == "Credentials(username='alice')"
    assert (
        repr(Credentials(registry_token="x"))
        == "Credentials(username='', registry_token=<redacted>)"
    )


def test_has_basic() -> None:
    assert Credentials("alice", "pw").has_basic
    assert not Credentials(identity_token="t").has_basic


def test_credentials_are_immutable_and_hashable() -> None:
    credentials = Credentials("alice", "pw")
    with pytest.raises(AttributeError):
        credentials.password = "other"  # type: ignore[misc]
    assert hash(credentials) == hash(Credentials("alice", "pw"))
