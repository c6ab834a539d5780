"""Image references: the docker/distribution grammar, normalised as Docker and containerd do.

Grammar (as in the distribution ``reference`` package)::

    reference        := name [ ":" tag ] [ "@" digest ]
    name             := [domain "/"] path-component ["/" path-component]*
    domain           := host [":" port-number]
    host             := domain-name | "[" IPv6address "]"
    domain-name      := domain-component ["." domain-component]*
    domain-component := /([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])/
    port-number      := /[0-9]+/
    path-component   := alpha-numeric [separator alpha-numeric]*
    alpha-numeric    := /[a-z0-9]+/
    separator        := /[_.]|__|[-]+/
    tag              := /[\\w][\\w.-]{0,127}/
    digest           := algorithm ":" hex

Which first component is a domain: the first ``/``-separated component of a name is a
domain when it contains ``.`` or ``:``, is ``localhost``, or contains an uppercase letter
(a repository path cannot, so Docker reads it as a host name). Otherwise the whole name is
a repository on Docker Hub: ``busybox`` is ``docker.io/library/busybox`` and ``user/img``
is ``docker.io/user/img``. ``index.docker.io`` (Docker Hub's legacy name) becomes
``docker.io``. A single component without ``/`` is always a Docker Hub name, so
``localhost`` alone is ``docker.io/library/localhost`` (as in Docker).

Digests: only the algorithms images use are accepted, with their exact lowercase hex
length (``sha256`` 64, ``sha384`` 96, ``sha512`` 128).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moorage.errors import InvalidArgument

#: Docker Hub's canonical domain, the one users see (``docker.io/library/busybox:latest``).
#: Its registry API lives on another host; :mod:`moorage.image.registries` maps that.
DEFAULT_DOMAIN = "docker.io"
#: Docker Hub's legacy domain, normalised to :data:`DEFAULT_DOMAIN`.
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
#: Namespace of Docker Hub's official images.
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
#: Longest allowed name (domain and path), as in the distribution package.
NAME_TOTAL_LENGTH_MAX = 255

#: Hex length of each accepted digest algorithm.
DIGEST_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}

_ALPHANUMERIC = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALPHANUMERIC}(?:{_SEPARATOR}{_ALPHANUMERIC})*"
_DOMAIN_NAME_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_NAME_COMPONENT}(?:\.{_DOMAIN_NAME_COMPONENT})*"
_IPV6_ADDRESS = r"\[[a-fA-F0-9:]+\]"
_DOMAIN = rf"(?:{_DOMAIN_NAME}|{_IPV6_ADDRESS})(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST_ALGORITHM = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*"

# re.ASCII: Go's \w is ASCII-only; Python's would also match other letters.
_PATH_COMPONENT_RE = re.compile(_PATH_COMPONENT, re.ASCII)
_DOMAIN_RE = re.compile(_DOMAIN, re.ASCII)
_DOMAIN_NAME_RE = re.compile(_DOMAIN_NAME, re.ASCII)
_TAG_RE = re.compile(_TAG, re.ASCII)
_DIGEST_ALGORITHM_RE = re.compile(_DIGEST_ALGORITHM, re.ASCII)
_LOWER_HEX_RE = re.compile(r"[a-f0-9]+", re.ASCII)
_IDENTIFIER_RE = re.compile(r"[a-f0-9]{64}", re.ASCII)
_ALLOWED_CHARS_RE = re.compile(r"[!-~]+", re.ASCII)  # printable ASCII, no space


@dataclass(frozen=True)
class Reference:
    """A parsed, normalised image reference.

    Build one with :func:`parse`, :func:`normalize` or :func:`with_domain`; the
    constructor itself does not validate.
    """

    domain: str  # "docker.io", "localhost:5000", "127.0.0.1:5000", "[::1]:5000"
    path: str  # "library/busybox"
    tag: str | None = None
    digest: str | None = None  # "sha256:<64 hex>"

    @property
    def name(self) -> str:
        """The repository name with its domain: ``docker.io/library/busybox``."""
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        return self.name + _suffix(self.tag, self.digest)

    @property
    def familiar(self) -> str:
        """The short form Docker shows: ``busybox:latest``, ``user/img``, ``quay.io/a/b:1``."""
        return self.familiar_name + _suffix(self.tag, self.digest)

    @property
    def familiar_name(self) -> str:
        """:attr:`name` without ``docker.io/`` and, for official images, ``library/``."""
        if self.domain != DEFAULT_DOMAIN:
            return self.name
        if self.path.startswith(OFFICIAL_REPO_PREFIX):
            rest = self.path[len(OFFICIAL_REPO_PREFIX) :]
            if "/" not in rest:
                return rest
        return self.path

    def with_tag(self, tag: str) -> Reference:
        """This reference with ``tag`` (validated) instead of its tag; the digest is kept."""
        if not _TAG_RE.fullmatch(tag):
            raise _invalid(f"{self.name}:{tag}", f"invalid tag {tag!r}")
        return Reference(self.domain, self.path, tag, self.digest)

    def with_digest(self, digest: str) -> Reference:
        """This reference with ``digest`` (validated); the tag is kept."""
        why = _digest_error(digest)
        if why is not None:
            raise _invalid(f"{self.name}@{digest}", why)
        return Reference(self.domain, self.path, self.tag, digest)

    def name_only(self) -> Reference:
        """The repository alone, without tag or digest."""
        return Reference(self.domain, self.path)


@dataclass(frozen=True)
class Parts:
    """A syntactically valid reference before Docker Hub normalisation (see :func:`split`)."""

    domain: str | None  # None when the first component is not a domain
    path: str
    tag: str | None
    digest: str | None


def _suffix(tag: str | None, digest: str | None) -> str:
    out = ""
    if tag is not None:
        out += ":" + tag
    if digest is not None:
        out += "@" + digest
    return out


def _invalid(ref: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"invalid image reference {_quote(ref)}: {why}")


def _quote(text: str) -> str:
    # Keep messages to one readable line whatever the input holds.
    shown = text if len(text) <= 300 else text[:300] + "..."
    return '"' + shown.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'


def _digest_error(digest: str) -> str | None:
    """Why ``digest`` is not a valid digest, or None when it is."""
    algorithm, sep, hex_part = digest.partition(":")
    if not sep or not _DIGEST_ALGORITHM_RE.fullmatch(algorithm):
        return f"invalid digest {digest!r}: expected <algorithm>:<hex>"
    expected = DIGEST_HEX_LENGTHS.get(algorithm)
    if expected is None:
        known = ", ".join(sorted(DIGEST_HEX_LENGTHS))
        return f"unsupported digest algorithm {algorithm!r} (supported: {known})"
    if len(hex_part) != expected or not _LOWER_HEX_RE.fullmatch(hex_part):
        return f"invalid {algorithm} digest: expected {expected} lowercase hex characters"
    return None


def _looks_like_domain(component: str) -> bool:
    """Whether the first component of a multi-component name is read as a domain."""
    return (
        "." in component
        or ":" in component
        or component == "localhost"
        or component.lower() != component
    )


def split(ref: str) -> Parts:
    """Check ``ref`` against the grammar and split it, without normalising anything:
    ``busybox:1`` -> ``Parts(None, "busybox", "1", None)``. Raises :class:`InvalidArgument`."""
    if not isinstance(ref, str):
        raise InvalidArgument(
            f"invalid image reference: expected a string, got {type(ref).__name__}"
        )
    if ref == "":
        raise _invalid(ref, "empty reference")
    if not _ALLOWED_CHARS_RE.fullmatch(ref):
        raise _invalid(ref, "contains whitespace, control or non-ASCII characters")
    if _IDENTIFIER_RE.fullmatch(ref):
        raise _invalid(ref, "a 64-character hexadecimal string is an image ID, not a name")

    rest, at, digest = ref.partition("@")
    if at:
        if not rest:
            raise _invalid(ref, "missing repository name before '@'")
        why = _digest_error(digest)
        if why is not None:
            raise _invalid(ref, why)
    else:
        digest = ""

    tag: str | None = None
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        rest, tag = rest[:colon], rest[colon + 1 :]
        if tag == "":
            raise _invalid(ref, "empty tag after ':'")
        if not _TAG_RE.fullmatch(tag):
            raise _invalid(
                ref,
                f"invalid tag {tag!r}: a tag is up to 128 letters, digits, '_', '.' or '-' "
                "and does not start with '.' or '-'",
            )

    if rest == "":
        raise _invalid(ref, "missing repository name")
    domain: str | None = None
    first, slash, remainder = rest.partition("/")
    if slash and _looks_like_domain(first):
        if not _DOMAIN_RE.fullmatch(first):
            raise _invalid(ref, f"invalid registry host {first!r}")
        domain, path = first, remainder
    else:
        path = rest

    for component in path.split("/"):
        if component == "":
            raise _invalid(ref, "empty path component (leading, trailing or double '/')")
        if not _PATH_COMPONENT_RE.fullmatch(component):
            if _PATH_COMPONENT_RE.fullmatch(component.lower()):
                raise _invalid(ref, "repository name must be lowercase")
            raise _invalid(
                ref,
                f"invalid path component {component!r}: lowercase letters and digits, "
                "separated by '.', '_', '__' or '-'",
            )
    return Parts(domain, path, tag, digest or None)


def _build(ref_text: str, domain: str, path: str, tag: str | None, digest: str | None) -> Reference:
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = OFFICIAL_REPO_PREFIX + path
    reference = Reference(domain, path, tag, digest)
    if len(reference.name) > NAME_TOTAL_LENGTH_MAX:
        raise _invalid(
            ref_text, f"repository name is longer than {NAME_TOTAL_LENGTH_MAX} characters"
        )
    return reference


def parse(ref: str) -> Reference:
    """Parse and normalise ``ref``, qualified or not; no default tag is added.

    ``busybox`` -> ``docker.io/library/busybox``; ``quay.io/a/b:1`` as is.
    Raises :class:`InvalidArgument` saying what is wrong.
    """
    parts = split(ref)
    return _build(ref, parts.domain or DEFAULT_DOMAIN, parts.path, parts.tag, parts.digest)


def normalize(ref: str) -> Reference:
    """:func:`parse`, then add ``:latest`` when there is neither tag nor digest."""
    reference = parse(ref)
    if reference.tag is None and reference.digest is None:
        return Reference(reference.domain, reference.path, DEFAULT_TAG, None)
    return reference


def is_short_name(ref: str) -> bool:
    """Whether ``ref`` names no registry (``busybox``, ``user/img:1``), so that
    unqualified-search registries and aliases apply. Does not validate ``ref``."""
    name = ref.partition("@")[0]
    first, slash, _ = name.partition("/")
    return not (slash and _looks_like_domain(first))


def is_domain(text: str) -> bool:
    """Whether ``text`` is a registry host[:port] that a reference would read as one
    (``quay.io``, ``localhost:5000``, ``[::1]:5000``; not ``myhost``)."""
    return bool(_DOMAIN_RE.fullmatch(text)) and _looks_like_domain(text)


def is_domain_name(text: str) -> bool:
    """Whether ``text`` is a DNS-style host name (no port, no brackets)."""
    return bool(_DOMAIN_NAME_RE.fullmatch(text))


def with_domain(short: str, domain: str) -> Reference:
    """Qualify the short name ``short`` with the registry ``domain``, adding ``:latest``
    when there is neither tag nor digest.

    ``busybox`` + ``quay.io`` -> ``quay.io/busybox:latest``; on ``docker.io`` official
    images get ``library/``: ``docker.io/library/busybox:latest``.
    """
    parts = split(short)
    if parts.domain is not None:
        raise _invalid(short, "is not a short name: it already names a registry")
    if not is_domain(domain):
        raise _invalid(
            f"{domain}/{short}",
            f"{domain!r} is not a registry host[:port] (one needs a '.', a ':port', "
            "or to be 'localhost')",
        )
    tag = parts.tag
    if tag is None and parts.digest is None:
        tag = DEFAULT_TAG
    return _build(f"{domain}/{short}", domain, parts.path, tag, parts.digest)
