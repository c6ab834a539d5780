"""Registry credentials from a CRI ``AuthConfig`` (``PullImageRequest.auth``).

kubelet fills ``AuthConfig`` from a pod's image pull secrets or a credential provider:
either ``username``/``password``, or ``auth`` (base64 of ``user:password``, as in a
docker config file), or an ``identity_token`` (a refresh token for the registry's token
service), or a ``registry_token`` (a bearer token to send as is).

Decisions: when ``auth`` is set it is decoded, must be valid, and wins over ``username``
and ``password`` (as in CRI-O); ``server_address`` only tells which registry kubelet
matched the credentials for, and is not kept. Secrets never appear in a repr or a message.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from moorage.errors import InvalidArgument

_REDACTED = "<redacted>"


@dataclass(frozen=True, repr=False)
class Credentials:
    """What to authenticate with. Its repr shows the username and masks everything else."""

    username: str = ""
    password: str = ""
    identity_token: str = ""
    registry_token: str = ""

    def __repr__(self) -> str:
        fields = [f"username={self.username!r}"]
        for name in ("password", "identity_token", "registry_token"):
            if getattr(self, name):
                fields.append(f"{name}={_REDACTED}")
        return f"Credentials({', '.join(fields)})"

    __str__ = __repr__

    @property
    def has_basic(self) -> bool:
        """Whether there is a username/password pair for HTTP Basic or a token request."""
        return bool(self.username or self.password)


def decode_auth(auth: str) -> tuple[str, str]:
    """Decode a docker-config ``auth`` value, base64 of ``user:password``.

    Missing ``=`` padding and line breaks are tolerated. Raises :class:`InvalidArgument` naming
    ``auth.auth`` without showing the value.
    """
    # Line breaks from wrapped base64 output are ignored, as Go's decoder does.
    text = auth.replace("\r", "").replace("\n", "").strip()
    if not text.isascii():
        raise InvalidArgument("auth.auth: not valid base64 (non-ASCII characters)")
    text += "=" * (-len(text) % 4)
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidArgument("auth.auth: not valid base64") from err
    try:
        plain = decoded.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidArgument("auth.auth: the decoded value is not UTF-8 text") from err
    username, colon, password = plain.partition(":")
    if not colon:
        raise InvalidArgument('auth.auth: the decoded value is not "username:password"')
    # Some tools pad the password with NUL bytes; Docker and CRI-O strip them.
    return username, password.strip("\x00")


def from_auth_config(
    username: str,
    password: str,
    auth: str,
    server_address: str,
    identity_token: str,
    registry_token: str,
) -> Credentials | None:
    """Credentials from the fields of a CRI ``AuthConfig``; None when it carries none.

    ``auth`` wins over ``username``/``password`` when set; malformed ``auth`` raises
    :class:`InvalidArgument` naming ``auth.auth``.
    """
    del server_address  # informational only; see the module docstring
    if auth:
        username, password = decode_auth(auth)
    credentials = Credentials(
        username=username,
        password=password,
        identity_token=identity_token,
        registry_token=registry_token,
    )
    if credentials == Credentials():
        return None
    return credentials
