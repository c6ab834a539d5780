"""registries.conf: search registries, aliases, mirrors, blocking, and where a pull goes.

The format is containers-registries.conf(5), the file CRI-O and podman read, version 2::

    unqualified-search-registries = ["quay.io", "docker.io"]
    short-name-mode = "enforcing"

    [[registry]]
    prefix = "docker.io/library"
    location = "mirror.example.com:5000/lib"
    insecure = false
    blocked = false
    mirror-by-digest-only = false

    [[registry.mirror]]
    location = "cache.example.com"
    insecure = true
    pull-from-mirror = "all"          # or "digest-only", "tag-only"

    [aliases]
    "busybox" = "docker.io/library/busybox"

The deprecated version 1 tables ``[registries.search]``, ``[registries.insecure]`` and
``[registries.block]`` (each ``registries = [...]``) are read too, in the main file only,
and never mixed with version 2 keys. Drop-in files ``<file>.d/*.conf`` beside the main
file are read in lexical order after it: a later file's ``[[registry]]`` replaces an
earlier one with the same prefix, its ``unqualified-search-registries``,
``short-name-mode`` and ``credential-helpers`` replace earlier values when present, and
its aliases are merged (an alias set to ``""`` is removed).

Decisions of ours, where the man page leaves room or CRI-O and Kubernetes disagree:

* Short names with no ``unqualified-search-registries`` resolve on ``docker.io``
  (:data:`DEFAULT_SEARCH_REGISTRIES`). Pod specs say ``busybox`` and mean Docker Hub, as
  containerd always does; CRI-O would refuse such a pull.
* ``short-name-mode`` is validated and kept but not enforced: a daemon has no terminal to
  prompt on, so every search registry is tried in order, as CRI-O does.
* A key that this format does not have is an error that names it, so that typos show.
* A prefix of only a host matches that host and no other port: ``example.com`` does not
  match ``example.com:5000/img`` (containers/image matches it by accident). A wildcard
  ``*.example.com`` matches its subdomains on any port. At equal length an exact prefix
  wins over a wildcard.
* Within one file the first ``[[registry]]`` with a given prefix wins (containers/image
  ignores later duplicates too).
* A location that rewrites a reference into one without a registry host (prefix
  ``example.com/foo``, location ``foo.example.net``, pulling ``example.com/foo:1``) is an
  error, never a silent fall-back to Docker Hub.

Every :class:`PullSource` says where to connect: ``source.host`` (the same as
``source.endpoint.host``) with Docker Hub's names mapped to its API host by
:func:`registry_host`, and ``source.reference.path`` is the repository to ask for there.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moorage.errors import InvalidArgument, PermissionDenied
from moorage.image import reference as refs
from moorage.image.reference import Reference

#: Where Docker Hub's registry API is served. ``docker.io`` is only the name users see;
#: this is the one place that maps one to the other (see :func:`registry_host`).
DOCKER_IO_REGISTRY_HOST = "registry-1.docker.io"

#: Search registries for short names when the configuration lists none (a moorage
#: decision: Kubernetes users mean Docker Hub by ``busybox``).
DEFAULT_SEARCH_REGISTRIES: tuple[str, ...] = (refs.DEFAULT_DOMAIN,)

SHORT_NAME_MODES = ("enforcing", "permissive", "disabled")
DEFAULT_SHORT_NAME_MODE = "permissive"

PULL_FROM_MIRROR_ALL = "all"
PULL_FROM_MIRROR_DIGEST_ONLY = "digest-only"
PULL_FROM_MIRROR_TAG_ONLY = "tag-only"
PULL_FROM_MIRROR_VALUES = (
    PULL_FROM_MIRROR_ALL,
    PULL_FROM_MIRROR_DIGEST_ONLY,
    PULL_FROM_MIRROR_TAG_ONLY,
)

_TOP_KEYS = frozenset(
    {
        "unqualified-search-registries",
        "short-name-mode",
        "credential-helpers",
        "additional-layer-store-auth-helper",
        "registry",
        "aliases",
        "registries",  # version 1
    }
)
_V2_KEYS = _TOP_KEYS - {"registries"}
_REGISTRY_KEYS = frozenset(
    {"prefix", "location", "insecure", "blocked", "mirror", "mirror-by-digest-only"}
)
_MIRROR_KEYS = frozenset({"location", "insecure", "pull-from-mirror"})
_V1_TABLES = ("search", "insecure", "block")


class RegistriesConfigError(InvalidArgument):
    """A registries.conf file that cannot be used; the message names file and key."""


def registry_host(domain: str) -> str:
    """The host[:port] to connect to for a reference's ``domain``: Docker Hub's names
    (``docker.io``, legacy ``index.docker.io``) map to its API host, others are themselves."""
    if domain in (refs.DEFAULT_DOMAIN, refs.LEGACY_DEFAULT_DOMAIN):
        return DOCKER_IO_REGISTRY_HOST
    return domain


@dataclass(frozen=True)
class Endpoint:
    """A place images are pulled from: ``host[:port][/path-prefix]``.

    In a :class:`PullSource` the host part is the one to connect to: ``docker.io`` has
    already been mapped to :data:`DOCKER_IO_REGISTRY_HOST` there.
    """

    location: str
    insecure: bool = False  # plain HTTP and unverified TLS allowed

    @property
    def host(self) -> str:
        """The ``host[:port]`` part of :attr:`location`."""
        return self.location.partition("/")[0]


@dataclass(frozen=True)
class Mirror:
    """One ``[[registry.mirror]]`` table."""

    location: str
    insecure: bool = False
    pull_from_mirror: str = PULL_FROM_MIRROR_ALL

    @property
    def endpoint(self) -> Endpoint:
        """The mirror as a place to connect to (``docker.io`` mapped to its API host)."""
        return _endpoint(self.location, self.insecure)

    def serves(self, by_digest: bool) -> bool:
        if self.pull_from_mirror == PULL_FROM_MIRROR_DIGEST_ONLY:
            return by_digest
        if self.pull_from_mirror == PULL_FROM_MIRROR_TAG_ONLY:
            return not by_digest
        return True


@dataclass(frozen=True)
class Registry:
    """One ``[[registry]]`` table, with ``prefix`` filled in from ``location`` if absent.

    ``location`` is empty only with a wildcard prefix (``*.example.com``): then references
    are used as they are and only the other settings apply.
    """

    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirror_by_digest_only: bool = False
    mirrors: tuple[Mirror, ...] = ()

    @property
    def is_wildcard(self) -> bool:
        return self.prefix.startswith("*.")

    def match_length(self, ref: Reference) -> int | None:
        """How many characters of ``str(ref)`` this registry's prefix covers, or None."""
        text = str(ref)
        if self.is_wildcard:
            host = _host_without_port(ref.domain)
            return len(ref.domain) if host.endswith(self.prefix[1:]) else None
        prefix = self.prefix
        if text == prefix:
            return len(prefix)
        if text.startswith(prefix):
            after = text[len(prefix)]
            # After a host only "/" may follow (":" would start another port); after a
            # repository path a ":tag" or "@digest" may follow too.
            if after == "/" or ("/" in prefix and after in ":@"):
                return len(prefix)
        return None


@dataclass(frozen=True)
class PullSource:
    """One place to try: the endpoint to connect to, and the reference rewritten for it
    (request ``/v2/<reference.path>/...`` on :attr:`host`)."""

    endpoint: Endpoint
    reference: Reference

    @property
    def host(self) -> str:
        """The host[:port] to connect to (Docker Hub's API host for ``docker.io``)."""
        return registry_host(self.reference.domain)


@dataclass(frozen=True)
class RegistriesConfig:
    """The merged configuration. Build with :meth:`load` or :meth:`parse`."""

    unqualified_search_registries: tuple[str, ...] = ()
    short_name_mode: str = DEFAULT_SHORT_NAME_MODE
    registries: tuple[Registry, ...] = ()
    #: Short name (``busybox``, ``user/img``) -> repository, without tag or digest.
    aliases: Mapping[str, Reference] = field(default_factory=dict, hash=False)
    credential_helpers: tuple[str, ...] = ()
    additional_layer_store_auth_helper: str = ""
    #: The files that were read, in order (for messages).
    sources: tuple[str, ...] = ()

    @property
    def search_registries(self) -> tuple[str, ...]:
        """Registries to qualify short names with, in order; ``docker.io`` when none are
        configured."""
        return self.unqualified_search_registries or DEFAULT_SEARCH_REGISTRIES

    @classmethod
    def load(cls, path: Path, dropin_dir: Path | None = None) -> RegistriesConfig:
        """Read ``path`` (a missing file means defaults) and then the drop-ins in
        ``dropin_dir`` (default: ``<path>.d`` beside it), ``*.conf`` in lexical order."""
        partials: list[_Partial] = []
        text = _read(path)
        if text is not None:
            partials.append(_parse_partial(text, str(path), allow_v1=True))
        directory = dropin_dir if dropin_dir is not None else path.with_name(path.name + ".d")
        for dropin in _dropin_files(directory):
            dropin_text = _read(dropin)
            if dropin_text is not None:  # removed since the listing: ignore it
                partials.append(_parse_partial(dropin_text, str(dropin), allow_v1=False))
        return _merge(partials)

    @classmethod
    def parse(cls, text: str, source: str = "registries.conf") -> RegistriesConfig:
        """Parse one file's ``text``; ``source`` names it in error messages."""
        return _merge([_parse_partial(text, source, allow_v1=True)])

    def find_registry(self, ref: Reference) -> Registry | None:
        """The ``[[registry]]`` whose prefix matches ``ref`` longest, or None."""
        best: Registry | None = None
        best_rank = (-1, False)
        for registry in self.registries:
            if registry.match_length(ref) is None:
                continue
            rank = (len(registry.prefix), not registry.is_wildcard)
            if rank > best_rank:
                best, best_rank = registry, rank
        return best


def candidates(conf: RegistriesConfig, ref_text: str) -> list[Reference]:
    """The references to try, in order, for what a user asked for.

    A qualified reference is itself (normalised, ``:latest`` added when it has neither
    tag nor digest). A short name is its alias when ``[aliases]`` has one (its tag or
    digest carried over), and otherwise qualified with each search registry in turn.
    Raises :class:`InvalidArgument` for an invalid reference.
    """
    parts = refs.split(ref_text)
    if parts.domain is not None:
        return [refs.normalize(ref_text)]
    alias = conf.aliases.get(parts.path)
    if alias is not None:
        tag = parts.tag
        if tag is None and parts.digest is None:
            tag = refs.DEFAULT_TAG
        return [Reference(alias.domain, alias.path, tag, parts.digest)]
    out: list[Reference] = []
    for domain in conf.search_registries:
        candidate = refs.with_domain(ref_text, domain)
        if candidate not in out:
            out.append(candidate)
    return out


def pull_sources(conf: RegistriesConfig, ref: Reference) -> list[PullSource]:
    """Where to pull ``ref`` from, in order: the matching registry's mirrors that serve
    this kind of pull (by digest or by tag), then its location.

    Raises :class:`PermissionDenied` when the matching registry is blocked, and
    :class:`InvalidArgument` when a location rewrites ``ref`` into an invalid reference.
    """
    registry = conf.find_registry(ref)
    if registry is None:
        return [PullSource(_endpoint(ref.domain, False), ref)]
    if registry.blocked:
        raise PermissionDenied(
            f'registry "{registry.prefix}" is blocked by registries.conf: cannot pull "{ref}"'
        )
    by_digest = ref.digest is not None
    if registry.mirror_by_digest_only:
        mirrors = registry.mirrors if by_digest else ()
    else:
        mirrors = tuple(m for m in registry.mirrors if m.serves(by_digest))
    sources = [
        PullSource(mirror.endpoint, _rewrite(ref, registry, mirror.location)) for mirror in mirrors
    ]
    primary = _endpoint(registry.location or ref.domain, registry.insecure)
    sources.append(PullSource(primary, _rewrite(ref, registry, registry.location)))
    return sources


def _rewrite(ref: Reference, registry: Registry, location: str) -> Reference:
    if not location:
        return ref
    length = registry.match_length(ref)
    assert length is not None, "rewriting a reference its registry does not match"
    text = location + str(ref)[length:]
    try:
        parts = refs.split(text)
        if parts.domain is None:
            # "repo.example.com" + ":1" would read as a Docker Hub name.
            raise InvalidArgument("the result names no registry host")
        return refs.parse(text)
    except InvalidArgument as err:
        raise InvalidArgument(
            f'registries.conf: prefix "{registry.prefix}" with location "{location}" '
            f'rewrites "{ref}" into an invalid reference "{text}": {err.message}'
        ) from err


def _endpoint(location: str, insecure: bool) -> Endpoint:
    host, slash, rest = location.partition("/")
    return Endpoint(registry_host(host) + slash + rest, insecure)


def _host_without_port(domain: str) -> str:
    if domain.startswith("["):
        return domain[: domain.find("]") + 1]
    return domain.partition(":")[0]


# ---------------------------------------------------------------------------------------
# Reading files


@dataclass
class _Partial:
    """One file's settings; None means "not set here" (so earlier files' value stays)."""

    source: str
    search: tuple[str, ...] | None = None
    short_name_mode: str | None = None
    registries: list[Registry] = field(default_factory=list)
    aliases: dict[str, Reference | None] = field(default_factory=dict)
    credential_helpers: tuple[str, ...] | None = None
    als_helper: str | None = None


def _read(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise RegistriesConfigError(f"{path}: cannot read: {err.strerror or err}") from err
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RegistriesConfigError(f"{path}: not UTF-8 text: {err}") from err


def _dropin_files(directory: Path) -> list[Path]:
    try:
        entries = sorted(directory.iterdir(), key=lambda p: p.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as err:
        raise RegistriesConfigError(f"{directory}: cannot list: {err.strerror or err}") from err
    return [p for p in entries if p.name.endswith(".conf") and not p.is_dir()]


def _merge(partials: Iterable[_Partial]) -> RegistriesConfig:
    search: tuple[str, ...] = ()
    mode = DEFAULT_SHORT_NAME_MODE
    registries: dict[str, Registry] = {}
    aliases: dict[str, Reference] = {}
    helpers: tuple[str, ...] = ()
    als_helper = ""
    sources: list[str] = []
    for part in partials:
        sources.append(part.source)
        if part.search is not None:
            search = part.search
        if part.short_name_mode is not None:
            mode = part.short_name_mode
        for registry in part.registries:
            registries[registry.prefix] = registry  # replaces in place, else appends
        for name, target in part.aliases.items():
            if target is None:
                aliases.pop(name, None)
            else:
                aliases[name] = target
        if part.credential_helpers is not None:
            helpers = part.credential_helpers
        if part.als_helper is not None:
            als_helper = part.als_helper
    return RegistriesConfig(
        unqualified_search_registries=search,
        short_name_mode=mode,
        registries=tuple(registries.values()),
        aliases=aliases,
        credential_helpers=helpers,
        additional_layer_store_auth_helper=als_helper,
        sources=tuple(sources),
    )


class _Checker:
    """Type and value checks whose errors name the file and the key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, where: str, why: str) -> RegistriesConfigError:
        if where:
            return RegistriesConfigError(f"{self.source}: {where}: {why}")
        return RegistriesConfigError(f"{self.source}: {why}")

    def unknown_keys(self, table: Mapping[str, Any], known: frozenset[str], where: str) -> None:
        for key in table:
            if key not in known:
                raise self.error(where, f"unknown key {_q(key)}")

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise self.error(where, f"must be a string, not {_toml_type(value)}")
        return value

    def boolean(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.error(where, f"must be true or false, not {_toml_type(value)}")
        return value

    def strings(self, value: Any, where: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.error(where, f"must be an array of strings, not {_toml_type(value)}")
        return tuple(self.string(item, f"{where}[{i}]") for i, item in enumerate(value))

    def tables(self, value: Any, where: str) -> list[dict[str, Any]]:
        if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
            raise self.error(where, f"must be an array of tables, not {_toml_type(value)}")
        return value

    def table(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(where, f"must be a table, not {_toml_type(value)}")
        return value

    def location(self, value: str, where: str, *, may_be_empty: bool = False) -> str:
        """A ``host[:port][/path][:tag|@digest]`` value, trailing ``/`` removed."""
        text = value.rstrip("/")
        if text == "":
            if may_be_empty:
                return ""
            raise self.error(where, "must not be empty")
        if "://" in text:
            raise self.error(where, f"{_q(value)}: URI schemes are not supported, give host[:port]")
        host, slash, _ = text.partition("/")
        if not refs.is_domain(host):
            raise self.error(
                where,
                f"{_q(value)} does not start with a registry host[:port] (a name with a '.', "
                "a ':port', or 'localhost')",
            )
        if slash:
            try:
                refs.split(text)
            except InvalidArgument as err:
                raise self.error(where, err.message) from err
        return text

    def prefix(self, value: str, where: str) -> str:
        text = value.rstrip("/")
        if text.startswith("*."):
            if not refs.is_domain_name(text[2:]):
                raise self.error(
                    where,
                    f"{_q(value)}: a wildcard prefix is '*.' and a host name only, "
                    "like *.example.com (no port, path, tag or digest)",
                )
            return text
        if "*" in text:
            raise self.error(where, f"{_q(value)}: '*' is only allowed as a leading '*.'")
        return self.location(text, where)


def _parse_partial(text: str, source: str, *, allow_v1: bool) -> _Partial:
    check = _Checker(source)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise RegistriesConfigError(f"{source}: invalid TOML: {err}") from err
    check.unknown_keys(data, _TOP_KEYS, "")
    part = _Partial(source)

    if "registries" in data:
        v1 = _parse_v1(check, data["registries"])
        if v1 is not None:
            if not allow_v1:
                raise check.error(
                    "[registries]",
                    "the version 1 tables [registries.search], [registries.insecure] and "
                    "[registries.block] are not allowed in drop-in files; use version 2",
                )
            mixed = sorted(k for k in data if k in _V2_KEYS)
            if mixed:
                raise check.error(
                    "[registries]",
                    "version 1 tables cannot be mixed with version 2 keys "
                    + ", ".join(_q(k) for k in mixed),
                )
            part.search, part.registries = v1
            return part

    if "unqualified-search-registries" in data:
        key = "unqualified-search-registries"
        entries: list[str] = []
        for i, entry in enumerate(check.strings(data[key], key)):
            entries.append(_search_registry(check, entry, f"{key}[{i}]"))
        part.search = tuple(entries)
    if "short-name-mode" in data:
        mode = check.string(data["short-name-mode"], "short-name-mode")
        if mode and mode not in SHORT_NAME_MODES:
            raise check.error(
                "short-name-mode",
                f"{_q(mode)} is not one of " + ", ".join(_q(m) for m in SHORT_NAME_MODES),
            )
        part.short_name_mode = mode or None
    if "credential-helpers" in data:
        part.credential_helpers = check.strings(data["credential-helpers"], "credential-helpers")
    if "additional-layer-store-auth-helper" in data:
        key = "additional-layer-store-auth-helper"
        part.als_helper = check.string(data[key], key)
    if "registry" in data:
        seen: set[str] = set()
        for i, table in enumerate(check.tables(data["registry"], "[[registry]]")):
            registry = _parse_registry(check, table, f"[[registry]] #{i + 1}")
            if registry.prefix not in seen:  # the first one with a prefix wins
                seen.add(registry.prefix)
                part.registries.append(registry)
    if "aliases" in data:
        for name, value in check.table(data["aliases"], "[aliases]").items():
            part.aliases[name] = _parse_alias(check, name, value)
    return part


def _search_registry(check: _Checker, entry: str, where: str) -> str:
    text = entry.rstrip("/")
    if not refs.is_domain(text):
        raise check.error(
            where,
            f"{_q(entry)} is not a registry host[:port] (a name with a '.', a ':port', "
            "or 'localhost'; no path)",
        )
    return text


def _parse_registry(check: _Checker, table: dict[str, Any], where: str) -> Registry:
    if "prefix" in table:
        where = f"{where} (prefix {_q(str(table['prefix']))})"
    elif "location" in table:
        where = f"{where} (location {_q(str(table['location']))})"
    if "pull-from-mirror" in table:
        raise check.error(
            where, '"pull-from-mirror" is a setting of a [[registry.mirror]], not a [[registry]]'
        )
    check.unknown_keys(table, _REGISTRY_KEYS, where)

    raw_prefix = check.string(table.get("prefix", ""), f"{where}: prefix")
    raw_location = check.string(table.get("location", ""), f"{where}: location")
    if raw_prefix.rstrip("/") == "":
        if raw_location.rstrip("/") == "":
            raise check.error(where, "needs a prefix or a location")
        location = check.location(raw_location, f"{where}: location")
        prefix = location
    else:
        prefix = check.prefix(raw_prefix, f"{where}: prefix")
        wildcard = prefix.startswith("*.")
        location = check.location(raw_location, f"{where}: location", may_be_empty=wildcard)

    insecure = check.boolean(table.get("insecure", False), f"{where}: insecure")
    blocked = check.boolean(table.get("blocked", False), f"{where}: blocked")
    by_digest = check.boolean(
        table.get("mirror-by-digest-only", False), f"{where}: mirror-by-digest-only"
    )
    mirrors: list[Mirror] = []
    if "mirror" in table:
        for j, mirror_table in enumerate(check.tables(table["mirror"], f"{where}: mirror")):
            mirror = _parse_mirror(check, mirror_table, f"{where}: [[registry.mirror]] #{j + 1}")
            if by_digest and "pull-from-mirror" in mirror_table:
                raise check.error(
                    f"{where}: [[registry.mirror]] #{j + 1}",
                    '"pull-from-mirror" cannot be set when the registry sets '
                    '"mirror-by-digest-only"',
                )
            mirrors.append(mirror)
    return Registry(prefix, location, insecure, blocked, by_digest, tuple(mirrors))


def _parse_mirror(check: _Checker, table: dict[str, Any], where: str) -> Mirror:
    check.unknown_keys(table, _MIRROR_KEYS, where)
    if "location" not in table:
        raise check.error(where, "needs a location")
    location = check.location(
        check.string(table["location"], f"{where}: location"), f"{where}: location"
    )
    insecure = check.boolean(table.get("insecure", False), f"{where}: insecure")
    pull_from = check.string(
        table.get("pull-from-mirror", PULL_FROM_MIRROR_ALL), f"{where}: pull-from-mirror"
    )
    if pull_from == "":
        pull_from = PULL_FROM_MIRROR_ALL
    if pull_from not in PULL_FROM_MIRROR_VALUES:
        raise check.error(
            f"{where}: pull-from-mirror",
            f"{_q(pull_from)} is not one of " + ", ".join(_q(v) for v in PULL_FROM_MIRROR_VALUES),
        )
    return Mirror(location, insecure, pull_from)


def _parse_alias(check: _Checker, name: str, value: Any) -> Reference | None:
    where = f"[aliases] {_q(name)}"
    target = check.string(value, where)
    try:
        parts = refs.split(name)
    except InvalidArgument as err:
        raise check.error(where, f"the name is not a valid short name: {err.message}") from err
    if parts.domain is not None:
        raise check.error(where, "the name must be a short name, without a registry")
    if parts.tag is not None or parts.digest is not None:
        raise check.error(where, "the name must not have a tag or digest")
    if target == "":
        return None  # removes an alias set by an earlier file
    if refs.is_short_name(target):
        raise check.error(where, f"the value {_q(target)} must name a registry")
    try:
        parsed = refs.parse(target)
    except InvalidArgument as err:
        raise check.error(where, err.message) from err
    if parsed.tag is not None or parsed.digest is not None:
        raise check.error(where, f"the value {_q(target)} must not have a tag or digest")
    return parsed


def _parse_v1(check: _Checker, value: Any) -> tuple[tuple[str, ...], list[Registry]] | None:
    """The version 1 tables as (search registries, registries), or None when they hold
    no entry at all (empty lists count as absent, as in containers/image)."""
    tables = check.table(value, "[registries]")
    check.unknown_keys(tables, frozenset(_V1_TABLES), "[registries]")
    lists: dict[str, tuple[str, ...]] = {}
    for name in _V1_TABLES:
        if name in tables:
            where = f"[registries.{name}]"
            table = check.table(tables[name], where)
            check.unknown_keys(table, frozenset({"registries"}), where)
            lists[name] = check.strings(table.get("registries", []), f"{where} registries")
    if not any(lists.values()):
        return None
    search = tuple(
        _search_registry(check, entry, f"[registries.search] registries[{i}]")
        for i, entry in enumerate(lists.get("search", ()))
    )
    flags: dict[str, dict[str, bool]] = {}  # location -> settings, in first-seen order
    for name, setting in (("block", "blocked"), ("insecure", "insecure")):
        for i, entry in enumerate(lists.get(name, ())):
            location = check.location(entry, f"[registries.{name}] registries[{i}]")
            flags.setdefault(location, {})[setting] = True
    registries = [
        Registry(
            prefix=location,
            location=location,
            insecure=settings.get("insecure", False),
            blocked=settings.get("blocked", False),
        )
        for location, settings in flags.items()
    ]
    return search, registries


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_type(value: Any) -> str:
    kinds = {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }
    return kinds.get(type(value), type(value).__name__)
