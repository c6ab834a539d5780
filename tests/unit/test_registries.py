"""registries.conf parsing and pull resolution (moorage.image.registries)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moorage.errors import InvalidArgument, PermissionDenied
from moorage.image.reference import Reference, normalize, parse
from moorage.image.registries import (
    DOCKER_IO_REGISTRY_HOST,
    Endpoint,
    Mirror,
    PullSource,
    RegistriesConfig,
    RegistriesConfigError,
    Registry,
    candidates,
    pull_sources,
    registry_host,
)

SHA256 = "sha256:" + "ab" * 32

MAN_PAGE_EXAMPLE = """
unqualified-search-registries = ["example.com"]

[[registry]]
prefix = "example.com/foo"
insecure = false
blocked = false
location = "internal-registry-for-example.com/bar"

[[registry.mirror]]
location = "example-mirror-0.local/mirror-for-foo"

[[registry.mirror]]
location = "example-mirror-1.local/mirrors/foo"
insecure = true

[[registry]]
location = "registry.com"

[[registry.mirror]]
location = "mirror.registry.com"
"""


def conf(text: str) -> RegistriesConfig:
    return RegistriesConfig.parse(text, "test.conf")


def sources(config: RegistriesConfig, ref: str) -> list[tuple[str, bool, str]]:
    return [
        (s.endpoint.location, s.endpoint.insecure, str(s.reference))
        for s in pull_sources(config, parse(ref))
    ]


# ---------------------------------------------------------------------------------------
# The man page's example


def test_man_page_example() -> None:
    config = conf(MAN_PAGE_EXAMPLE)
    assert config.unqualified_search_registries == ("example.com",)
    assert config.short_name_mode == "permissive"
    assert config.registries == (
        Registry(
            prefix="example.com/foo",
            location="internal-registry-for-example.com/bar",
            mirrors=(
                Mirror("example-mirror-0.local/mirror-for-foo"),
                Mirror("example-mirror-1.local/mirrors/foo", insecure=True),
            ),
        ),
        Registry(
            prefix="registry.com", location="registry.com", mirrors=(Mirror("mirror.registry.com"),)
        ),
    )
    assert sources(config, "example.com/foo/image:latest") == [
        (
            "example-mirror-0.local/mirror-for-foo",
            False,
            "example-mirror-0.local/mirror-for-foo/image:latest",
        ),
        (
            "example-mirror-1.local/mirrors/foo",
            True,
            "example-mirror-1.local/mirrors/foo/image:latest",
        ),
        (
            "internal-registry-for-example.com/bar",
            False,
            "internal-registry-for-example.com/bar/image:latest",
        ),
    ]
    # A mirror belongs to its own [[registry]] only.
    assert sources(config, "registry.com/image:latest") == [
        ("mirror.registry.com", False, "mirror.registry.com/image:latest"),
        ("registry.com", False, "registry.com/image:latest"),
    ]
    # No matching [[registry]]: the reference as it is.
    assert sources(config, "quay.io/a/b:1") == [("quay.io", False, "quay.io/a/b:1")]


def test_pull_source_types() -> None:
    config = conf(MAN_PAGE_EXAMPLE)
    [first, *_] = pull_sources(config, parse("example.com/foo/image:latest"))
    assert first == PullSource(
        Endpoint("example-mirror-0.local/mirror-for-foo", False),
        Reference("example-mirror-0.local", "mirror-for-foo/image", "latest", None),
    )
    assert first.host == "example-mirror-0.local"


# ---------------------------------------------------------------------------------------
# docker.io


def test_docker_io_connects_to_its_api_host() -> None:
    config = RegistriesConfig()
    [source] = pull_sources(config, normalize("busybox"))
    assert source.reference == Reference("docker.io", "library/busybox", "latest", None)
    assert source.endpoint == Endpoint(DOCKER_IO_REGISTRY_HOST, False)
    assert source.endpoint.host == source.host == DOCKER_IO_REGISTRY_HOST
    assert registry_host("docker.io") == DOCKER_IO_REGISTRY_HOST
    assert registry_host("index.docker.io") == DOCKER_IO_REGISTRY_HOST
    assert registry_host("quay.io") == "quay.io"
    assert registry_host("localhost:5000") == "localhost:5000"


def test_docker_io_library_rewritten_to_a_mirror_location() -> None:
    config = conf(
        """
[[registry]]
prefix = "docker.io/library"
location = "mirror.internal:5000/lib"
"""
    )
    [source] = pull_sources(config, normalize("busybox"))
    assert str(source.reference) == "mirror.internal:5000/lib/busybox:latest"
    assert source.endpoint == Endpoint("mirror.internal:5000/lib", False)
    assert source.host == "mirror.internal:5000"
    # Other docker.io namespaces do not match the library prefix.
    [other] = pull_sources(config, normalize("user/img"))
    assert str(other.reference) == "docker.io/user/img:latest"
    assert other.host == DOCKER_IO_REGISTRY_HOST


def test_docker_io_mirror_keeps_docker_io_as_primary() -> None:
    config = conf(
        """
[[registry]]
location = "docker.io"
[[registry.mirror]]
location = "mirror.gcr.example.com"
"""
    )
    result = pull_sources(config, normalize("busybox"))
    assert [(s.host, s.endpoint.host, str(s.reference)) for s in result] == [
        (
            "mirror.gcr.example.com",
            "mirror.gcr.example.com",
            "mirror.gcr.example.com/library/busybox:latest",
        ),
        (DOCKER_IO_REGISTRY_HOST, DOCKER_IO_REGISTRY_HOST, "docker.io/library/busybox:latest"),
    ]


def test_docker_io_as_a_location_connects_to_its_api_host() -> None:
    config = conf(
        """
[[registry]]
prefix = "example.com/hub"
location = "docker.io/library"
[[registry.mirror]]
location = "docker.io/mirrored"
"""
    )
    result = pull_sources(config, parse("example.com/hub/busybox:1"))
    assert [(s.endpoint.location, s.host, str(s.reference)) for s in result] == [
        (
            f"{DOCKER_IO_REGISTRY_HOST}/mirrored",
            DOCKER_IO_REGISTRY_HOST,
            "docker.io/mirrored/busybox:1",
        ),
        (
            f"{DOCKER_IO_REGISTRY_HOST}/library",
            DOCKER_IO_REGISTRY_HOST,
            "docker.io/library/busybox:1",
        ),
    ]


def test_endpoint_host_is_the_host_of_the_location() -> None:
    assert Endpoint("mirror.example.com:5000/lib/x").host == "mirror.example.com:5000"
    assert Endpoint("[::1]:5000").host == "[::1]:5000"


def test_docker_io_prefix_without_library_does_not_match_official_images() -> None:
    config = conf('[[registry]]\nprefix = "docker.io/alpine"\nlocation = "m.example.com/x"\n')
    [source] = pull_sources(config, normalize("alpine"))
    assert str(source.reference) == "docker.io/library/alpine:latest"
    [source] = pull_sources(config, normalize("alpine/git"))
    assert str(source.reference) == "m.example.com/x/git:latest"


# ---------------------------------------------------------------------------------------
# Mirrors by digest and by tag

MIRRORS_BY_KIND = """
[[registry]]
prefix = "example.com"
location = "example.com"

[[registry.mirror]]
location = "all.example.net"

[[registry.mirror]]
location = "digest.example.net"
pull-from-mirror = "digest-only"

[[registry.mirror]]
location = "tag.example.net"
pull-from-mirror = "tag-only"

[[registry.mirror]]
location = "empty.example.net"
pull-from-mirror = ""
"""


def test_pull_from_mirror() -> None:
    config = conf(MIRRORS_BY_KIND)
    by_tag = [s.endpoint.location for s in pull_sources(config, parse("example.com/a:1"))]
    assert by_tag == ["all.example.net", "tag.example.net", "empty.example.net", "example.com"]
    by_digest = [
        s.endpoint.location for s in pull_sources(config, parse("example.com/a@" + SHA256))
    ]
    assert by_digest == [
        "all.example.net",
        "digest.example.net",
        "empty.example.net",
        "example.com",
    ]
    # A tag and a digest: the digest decides.
    both = [s.reference for s in pull_sources(config, parse("example.com/a:1@" + SHA256))]
    assert [str(r) for r in both][1] == "digest.example.net/a:1@" + SHA256


def test_mirror_by_digest_only() -> None:
    config = conf(
        """
[[registry]]
prefix = "example.com"
location = "primary.example.com"
mirror-by-digest-only = true
[[registry.mirror]]
location = "m1.example.net"
[[registry.mirror]]
location = "m2.example.net"
"""
    )
    assert sources(config, "example.com/a:1") == [
        ("primary.example.com", False, "primary.example.com/a:1")
    ]
    assert [s[0] for s in sources(config, "example.com/a@" + SHA256)] == [
        "m1.example.net",
        "m2.example.net",
        "primary.example.com",
    ]


def test_mirror_by_digest_only_conflicts_with_pull_from_mirror() -> None:
    text = """
[[registry]]
location = "example.com"
mirror-by-digest-only = true
[[registry.mirror]]
location = "m.example.net"
pull-from-mirror = "all"
"""
    with pytest.raises(RegistriesConfigError, match='"pull-from-mirror" cannot be set'):
        conf(text)


# ---------------------------------------------------------------------------------------
# blocked and insecure


def test_blocked_registry() -> None:
    config = conf(
        """
[[registry]]
location = "bad.example.com"
blocked = true

[[registry]]
prefix = "example.com/blocked"
location = "example.com/blocked"
blocked = true
"""
    )
    with pytest.raises(PermissionDenied) as info:
        pull_sources(config, parse("bad.example.com/x:1"))
    assert "bad.example.com" in info.value.message
    assert "blocked by registries.conf" in info.value.message
    with pytest.raises(PermissionDenied):
        pull_sources(config, parse("example.com/blocked/x"))
    assert sources(config, "example.com/fine/x:1") == [
        ("example.com", False, "example.com/fine/x:1")
    ]


def test_longer_unblocked_prefix_overrides_blocked_host() -> None:
    config = conf(
        """
[[registry]]
location = "example.com"
blocked = true
[[registry]]
location = "example.com/allowed"
"""
    )
    assert sources(config, "example.com/allowed/x:1")[0][2] == "example.com/allowed/x:1"
    with pytest.raises(PermissionDenied):
        pull_sources(config, parse("example.com/other/x:1"))


def test_insecure_registry_and_mirrors() -> None:
    config = conf(
        """
[[registry]]
location = "localhost:5000"
insecure = true
[[registry.mirror]]
location = "cache.example.com"
"""
    )
    assert sources(config, "localhost:5000/x:1") == [
        ("cache.example.com", False, "cache.example.com/x:1"),
        ("localhost:5000", True, "localhost:5000/x:1"),
    ]


# ---------------------------------------------------------------------------------------
# Prefix matching

PREFIXES = """
[[registry]]
prefix = "example.com"
location = "host.example.net"

[[registry]]
prefix = "example.com/foo"
location = "foo.example.net"

[[registry]]
prefix = "example.com/foo/bar"
location = "bar.example.net/x"

[[registry]]
prefix = "example.com/foo/bar:v1"
location = "v1.example.net/pinned:v9"

[[registry]]
prefix = "*.example.org"
insecure = true

[[registry]]
prefix = "*.sub.example.org"
location = "sub.example.net"

[[registry]]
prefix = "exact.example.org"
location = "exact.example.net"
"""


@pytest.mark.parametrize(
    ("ref", "rewritten"),
    [
        ("example.com/a:1", "host.example.net/a:1"),
        ("example.com/foo/a:1", "foo.example.net/a:1"),
        ("example.com/foobar/a:1", "host.example.net/foobar/a:1"),
        ("example.com/foo/bar:2", "bar.example.net/x:2"),
        ("example.com/foo/bar@" + SHA256, "bar.example.net/x@" + SHA256),
        ("example.com/foo/bar/baz:2", "bar.example.net/x/baz:2"),
        ("example.com/foo/barn:2", "foo.example.net/barn:2"),
        ("example.com/foo/bar:v1", "v1.example.net/pinned:v9"),
        ("example.com/foo/bar:v10", "bar.example.net/x:v10"),
        # A host prefix does not match the host on another port.
        ("example.com:5000/a:1", "example.com:5000/a:1"),
        # Wildcards: any depth of subdomain, any port, never the bare domain.
        ("a.example.org/x:1", "a.example.org/x:1"),
        ("a.b.example.org/x:1", "a.b.example.org/x:1"),
        ("a.example.org:5000/x:1", "a.example.org:5000/x:1"),
        ("example.org/x:1", "example.org/x:1"),
        ("badexample.org/x:1", "badexample.org/x:1"),
        ("a.example.org.evil.com/x:1", "a.example.org.evil.com/x:1"),
        ("q.sub.example.org/x:1", "sub.example.net/x:1"),
        ("q.sub.example.org:443/x:1", "sub.example.net/x:1"),
        ("exact.example.org/x:1", "exact.example.net/x:1"),
        ("other.example.com/example.org/x:1", "other.example.com/example.org/x:1"),
    ],
)
def test_prefix_matching(ref: str, rewritten: str) -> None:
    result = pull_sources(conf(PREFIXES), parse(ref))
    assert str(result[-1].reference) == rewritten
    for source in result:
        assert source.endpoint.host == source.host == source.reference.domain


def test_wildcard_settings_apply_without_rewriting() -> None:
    config = conf(PREFIXES)
    found = config.find_registry(parse("a.example.org/x"))
    assert found is not None and found.prefix == "*.example.org" and found.location == ""
    [source] = pull_sources(config, parse("a.example.org/x:1"))
    assert source.endpoint == Endpoint("a.example.org", True)
    assert config.find_registry(parse("example.org/x")) is None


def test_exact_prefix_beats_wildcard_of_equal_length() -> None:
    config = conf(
        """
[[registry]]
prefix = "*.example.com"
blocked = true
[[registry]]
prefix = "a.example.com"
location = "a.example.com"
"""
    )
    # "*.example.com" and "a.example.com" are both 13 characters long.
    assert sources(config, "a.example.com/x:1") == [("a.example.com", False, "a.example.com/x:1")]
    with pytest.raises(PermissionDenied):
        pull_sources(config, parse("b.example.com/x:1"))


def test_wildcard_with_mirrors() -> None:
    config = conf(
        """
[[registry]]
prefix = "*.example.com"
[[registry.mirror]]
location = "cache.example.net/proxy"
"""
    )
    assert sources(config, "a.example.com:5000/x/y:1") == [
        ("cache.example.net/proxy", False, "cache.example.net/proxy/x/y:1"),
        ("a.example.com:5000", False, "a.example.com:5000/x/y:1"),
    ]


def test_first_duplicate_prefix_in_a_file_wins() -> None:
    config = conf(
        """
[[registry]]
location = "example.com"
insecure = true
[[registry]]
prefix = "example.com"
location = "example.com"
blocked = true
"""
    )
    assert config.registries == (Registry("example.com", "example.com", insecure=True),)


def test_trailing_slashes_are_removed() -> None:
    config = conf('[[registry]]\nprefix = "example.com/foo/"\nlocation = "m.example.net/x/"\n')
    assert config.registries[0].prefix == "example.com/foo"
    assert config.registries[0].location == "m.example.net/x"


def test_rewrite_into_an_invalid_reference() -> None:
    config = conf('[[registry]]\nprefix = "example.com/a"\nlocation = "m.example.net/x:t"\n')
    with pytest.raises(InvalidArgument, match=r"rewrites .* into an invalid reference"):
        pull_sources(config, parse("example.com/a/b:1"))


def test_rewrite_never_falls_back_to_docker_hub() -> None:
    # The repository itself maps to a bare host: "foo.example.net:1" would be read as
    # docker.io/library/foo.example.net:1, so it is an error instead.
    config = conf('[[registry]]\nprefix = "example.com/foo"\nlocation = "foo.example.net"\n')
    with pytest.raises(InvalidArgument, match="names no registry host"):
        pull_sources(config, parse("example.com/foo:1"))


# ---------------------------------------------------------------------------------------
# Short names: search registries and aliases


def test_candidates_default_to_docker_io() -> None:
    for config in (RegistriesConfig(), conf(""), conf("unqualified-search-registries = []")):
        assert config.search_registries == ("docker.io",)
        assert candidates(config, "busybox") == [normalize("busybox")]
        assert candidates(config, "user/img:1") == [parse("docker.io/user/img:1")]


def test_candidates_in_search_order() -> None:
    config = conf('unqualified-search-registries = ["quay.io", "docker.io", "localhost:5000"]')
    assert [str(r) for r in candidates(config, "busybox")] == [
        "quay.io/busybox:latest",
        "docker.io/library/busybox:latest",
        "localhost:5000/busybox:latest",
    ]
    assert [str(r) for r in candidates(config, "ns/img@" + SHA256)] == [
        "quay.io/ns/img@" + SHA256,
        "docker.io/ns/img@" + SHA256,
        "localhost:5000/ns/img@" + SHA256,
    ]


def test_candidates_are_deduplicated() -> None:
    config = conf('unqualified-search-registries = ["docker.io", "index.docker.io"]')
    assert candidates(config, "busybox") == [normalize("busybox")]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("quay.io/a/b", "quay.io/a/b:latest"),
        ("docker.io/busybox", "docker.io/library/busybox:latest"),
        ("localhost/x:1", "localhost/x:1"),
        ("example.com/foo@" + SHA256, "example.com/foo@" + SHA256),
    ],
)
def test_candidates_of_a_qualified_reference(text: str, expected: str) -> None:
    config = conf('unqualified-search-registries = ["quay.io"]\n[aliases]\n"foo" = "quay.io/x/foo"')
    assert [str(r) for r in candidates(config, text)] == [expected]


ALIASES = """
unqualified-search-registries = ["quay.io", "docker.io"]
short-name-mode = "enforcing"

[aliases]
"busybox" = "docker.io/library/busybox"
"ns/tool" = "registry.example.com/tools/tool"
"legacy" = "docker.io/legacy"
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("busybox", ["docker.io/library/busybox:latest"]),
        ("busybox:1.36", ["docker.io/library/busybox:1.36"]),
        ("busybox@" + SHA256, ["docker.io/library/busybox@" + SHA256]),
        ("busybox:1@" + SHA256, ["docker.io/library/busybox:1@" + SHA256]),
        ("ns/tool:2", ["registry.example.com/tools/tool:2"]),
        ("legacy", ["docker.io/library/legacy:latest"]),
        # Aliases are looked up by the name as written.
        ("library/busybox", ["quay.io/library/busybox:latest", "docker.io/library/busybox:latest"]),
        ("alpine", ["quay.io/alpine:latest", "docker.io/library/alpine:latest"]),
    ],
)
def test_candidates_with_aliases(text: str, expected: list[str]) -> None:
    config = conf(ALIASES)
    assert config.short_name_mode == "enforcing"
    assert [str(r) for r in candidates(config, text)] == expected


def test_candidates_of_an_invalid_reference() -> None:
    with pytest.raises(InvalidArgument, match="invalid image reference"):
        candidates(RegistriesConfig(), "Busy Box")


@pytest.mark.parametrize("mode", ["enforcing", "permissive", "disabled"])
def test_short_name_modes(mode: str) -> None:
    assert conf(f'short-name-mode = "{mode}"').short_name_mode == mode


def test_empty_short_name_mode_is_permissive() -> None:
    assert conf('short-name-mode = ""').short_name_mode == "permissive"


def test_other_known_keys_are_accepted() -> None:
    config = conf(
        'credential-helpers = ["containers-auth.json", "secretservice"]\n'
        'additional-layer-store-auth-helper = "helper"\n'
    )
    assert config.credential_helpers == ("containers-auth.json", "secretservice")
    assert config.additional_layer_store_auth_helper == "helper"


# ---------------------------------------------------------------------------------------
# Errors that name the key

MIRROR_OF_EXAMPLE = (
    '[[registry]]\nlocation = "example.com"\n[[registry.mirror]]\nlocation = "m.example.com"\n'
)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (
            "unqualified-search-registrie = []",
            'test.conf: unknown key "unqualified-search-registrie"',
        ),
        ('[[registry]]\nlocation = "example.com"\ninsecur = true', 'unknown key "insecur"'),
        (
            '[[registry]]\nlocation = "example.com"\ninsecur = true',
            '[[registry]] #1 (location "example.com")',
        ),
        (
            MIRROR_OF_EXAMPLE + 'locaton = "x"',
            '[[registry]] #1 (location "example.com"): [[registry.mirror]] #1: '
            'unknown key "locaton"',
        ),
        (
            '[[registry]]\nprefix = "a.example.com"\nlocation = "example.com"\n'
            "mirror-by-tag-only = true",
            'unknown key "mirror-by-tag-only"',
        ),
        (
            '[registries.search]\nregistries = ["quay.io"]\n[registries.secure]\nregistries = []',
            'unknown key "secure"',
        ),
        (
            '[registries.search]\nregistry = ["quay.io"]',
            '[registries.search]: unknown key "registry"',
        ),
        # Types
        (
            'unqualified-search-registries = "quay.io"',
            "unqualified-search-registries: must be an array of strings, not a string",
        ),
        (
            "unqualified-search-registries = [1]",
            "unqualified-search-registries[0]: must be a string, not an integer",
        ),
        (
            '[[registry]]\nlocation = "example.com"\ninsecure = "yes"',
            "insecure: must be true or false, not a string",
        ),
        (
            '[[registry]]\nlocation = "example.com"\nblocked = 1',
            "blocked: must be true or false, not an integer",
        ),
        ('registry = "example.com"', "[[registry]]: must be an array of tables, not a string"),
        (
            '[[registry]]\nlocation = "example.com"\nmirror = ["m.example.com"]',
            "mirror: must be an array of tables",
        ),
        ('aliases = ["x"]', "[aliases]: must be a table, not an array"),
        ('[aliases]\n"x" = 1', '[aliases] "x": must be a string, not an integer'),
        ("short-name-mode = true", "short-name-mode: must be a string, not a boolean"),
        (
            '[[registry]]\nprefix = 1\nlocation = "example.com"',
            "prefix: must be a string, not an integer",
        ),
        # Values
        (
            'short-name-mode = "prompt"',
            'short-name-mode: "prompt" is not one of "enforcing", "permissive", "disabled"',
        ),
        (
            'unqualified-search-registries = ["myhost"]',
            'unqualified-search-registries[0]: "myhost" is not a registry host',
        ),
        (
            'unqualified-search-registries = ["quay.io/ns"]',
            'unqualified-search-registries[0]: "quay.io/ns" is not a registry host',
        ),
        ('unqualified-search-registries = ["https://quay.io"]', "is not a registry host"),
        ("[[registry]]\ninsecure = true", "needs a prefix or a location"),
        ('[[registry]]\nprefix = "example.com"', "location: must not be empty"),
        ('[[registry]]\nlocation = "https://example.com"', "URI schemes are not supported"),
        ('[[registry]]\nlocation = "myhost/x"', '"myhost/x" does not start with a registry host'),
        ('[[registry]]\nlocation = "example.com/Upper"', "must be lowercase"),
        ('[[registry]]\nlocation = "example.com/a@md5:00"', "unsupported digest algorithm"),
        (
            '[[registry]]\nprefix = "*.example.com/foo"\nlocation = "x.example.com"',
            "a wildcard prefix is '*.' and a host name only",
        ),
        ('[[registry]]\nprefix = "*.example.com:5000"', "a wildcard prefix"),
        (
            '[[registry]]\nprefix = "example.*.com"\nlocation = "x.example.com"',
            "'*' is only allowed as a leading '*.'",
        ),
        (
            '[[registry]]\nprefix = "*example.com"\nlocation = "x.example.com"',
            "'*' is only allowed",
        ),
        (
            '[[registry]]\nlocation = "example.com"\npull-from-mirror = "all"',
            '"pull-from-mirror" is a setting of a [[registry.mirror]]',
        ),
        (
            '[[registry]]\nlocation = "example.com"\n[[registry.mirror]]\ninsecure = true',
            "[[registry.mirror]] #1: needs a location",
        ),
        (
            '[[registry]]\nlocation = "example.com"\n[[registry.mirror]]\nlocation = ""',
            "[[registry.mirror]] #1: location: must not be empty",
        ),
        (
            MIRROR_OF_EXAMPLE + 'pull-from-mirror = "digest"',
            'pull-from-mirror: "digest" is not one of "all", "digest-only", "tag-only"',
        ),
        (
            '[aliases]\n"docker.io/busybox" = "docker.io/library/busybox"',
            "the name must be a short name",
        ),
        ('[aliases]\n"localhost/x" = "example.com/x"', "the name must be a short name"),
        (
            '[aliases]\n"busybox:1" = "docker.io/library/busybox"',
            "the name must not have a tag or digest",
        ),
        (
            '[aliases]\n"Busybox" = "docker.io/library/busybox"',
            "the name is not a valid short name",
        ),
        ('[aliases]\n"busybox" = "busybox"', 'the value "busybox" must name a registry'),
        ('[aliases]\n"busybox" = "docker.io/library/busybox:1"', "must not have a tag or digest"),
        ('[aliases]\n"busybox" = "quay.io/Busybox"', "must be lowercase"),
        # TOML itself
        ("[[registry]\n", "test.conf: invalid TOML"),
        (
            'unqualified-search-registries = ["a"]\nunqualified-search-registries = ["b"]',
            "invalid TOML",
        ),
    ],
)
def test_config_errors(text: str, fragment: str) -> None:
    with pytest.raises(RegistriesConfigError) as info:
        conf(text)
    assert info.value.message.startswith("test.conf: ")
    assert fragment in info.value.message
    assert isinstance(info.value, InvalidArgument)


# ---------------------------------------------------------------------------------------
# Version 1


def test_v1_format() -> None:
    config = conf(
        """
[registries.search]
registries = ['registry1.com', 'registry2.com']

[registries.insecure]
registries = ['registry3.com', 'registry1.com']

[registries.block]
registries = ['registry.untrusted.com', 'registry.unsafe.com']
"""
    )
    assert config.unqualified_search_registries == ("registry1.com", "registry2.com")
    assert config.registries == (
        Registry("registry.untrusted.com", "registry.untrusted.com", blocked=True),
        Registry("registry.unsafe.com", "registry.unsafe.com", blocked=True),
        Registry("registry3.com", "registry3.com", insecure=True),
        Registry("registry1.com", "registry1.com", insecure=True),
    )
    with pytest.raises(PermissionDenied):
        pull_sources(config, parse("registry.unsafe.com/x"))
    assert sources(config, "registry3.com/x:1") == [("registry3.com", True, "registry3.com/x:1")]
    assert [str(r) for r in candidates(config, "x")] == [
        "registry1.com/x:latest",
        "registry2.com/x:latest",
    ]


def test_v1_mixed_with_v2_is_refused() -> None:
    with pytest.raises(RegistriesConfigError, match="cannot be mixed with version 2 keys"):
        conf(
            'unqualified-search-registries = ["quay.io"]\n'
            '[registries.search]\nregistries = ["x.example.com"]'
        )


def test_empty_v1_tables_do_not_count() -> None:
    config = conf(
        'unqualified-search-registries = ["quay.io"]\n[registries.search]\nregistries = []\n'
        "[registries.block]\nregistries = []\n"
    )
    assert config.unqualified_search_registries == ("quay.io",)


# ---------------------------------------------------------------------------------------
# Files and drop-ins


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    config = RegistriesConfig.load(tmp_path / "registries.conf")
    assert config == RegistriesConfig()
    assert config.search_registries == ("docker.io",)
    assert config.sources == ()


def test_load_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "registries.conf"
    path.write_text(MAN_PAGE_EXAMPLE)
    config = RegistriesConfig.load(path)
    assert config.sources == (str(path),)
    assert config.registries == conf(MAN_PAGE_EXAMPLE).registries


def test_load_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "registries.conf"
    path.write_text("bogus = 1\n")
    with pytest.raises(RegistriesConfigError, match=f'^{path}: unknown key "bogus"'):
        RegistriesConfig.load(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(RegistriesConfigError, match="not UTF-8"):
        RegistriesConfig.load(path)


def test_dropins_merge_in_lexical_order(tmp_path: Path) -> None:
    path = tmp_path / "registries.conf"
    path.write_text(
        """
unqualified-search-registries = ["quay.io"]
short-name-mode = "enforcing"

[[registry]]
location = "example.com"
insecure = true

[[registry]]
location = "keep.example.com"

[aliases]
"busybox" = "docker.io/library/busybox"
"gone" = "quay.io/x/gone"
"""
    )
    dropins = tmp_path / "registries.conf.d"
    dropins.mkdir()
    (dropins / "20-second.conf").write_text(
        """
unqualified-search-registries = ["docker.io", "quay.io"]
[[registry]]
prefix = "example.com"
location = "mirror.example.net"
[aliases]
"gone" = ""
"""
    )
    (dropins / "10-first.conf").write_text(
        """
short-name-mode = "disabled"
unqualified-search-registries = ["first.example.com"]
[[registry]]
location = "new.example.com"
blocked = true
[aliases]
"tool" = "registry.example.com/tools/tool"
"busybox" = "quay.io/mirror/busybox"
"""
    )
    (dropins / "30-ignored.conf.bak").write_text("bogus = 1\n")
    (dropins / "40-directory.conf").mkdir()

    config = RegistriesConfig.load(path)
    assert config.sources == (
        str(path),
        str(dropins / "10-first.conf"),
        str(dropins / "20-second.conf"),
    )
    assert config.unqualified_search_registries == ("docker.io", "quay.io")
    assert config.short_name_mode == "disabled"
    assert config.registries == (
        Registry("example.com", "mirror.example.net"),  # replaced whole, in place
        Registry("keep.example.com", "keep.example.com"),
        Registry("new.example.com", "new.example.com", blocked=True),
    )
    assert dict(config.aliases) == {
        "busybox": parse("quay.io/mirror/busybox"),
        "tool": parse("registry.example.com/tools/tool"),
    }


def test_dropins_without_a_main_file(tmp_path: Path) -> None:
    dropins = tmp_path / "registries.conf.d"
    dropins.mkdir()
    (dropins / "a.conf").write_text('unqualified-search-registries = ["quay.io"]\n')
    config = RegistriesConfig.load(tmp_path / "registries.conf")
    assert config.unqualified_search_registries == ("quay.io",)


def test_dropin_directory_can_be_given(tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "a.conf").write_text('unqualified-search-registries = ["quay.io"]\n')
    config = RegistriesConfig.load(tmp_path / "registries.conf", dropin_dir=other)
    assert config.unqualified_search_registries == ("quay.io",)


def test_dropin_may_empty_the_search_list(tmp_path: Path) -> None:
    path = tmp_path / "registries.conf"
    path.write_text('unqualified-search-registries = ["quay.io"]\n')
    (tmp_path / "registries.conf.d").mkdir()
    (tmp_path / "registries.conf.d" / "a.conf").write_text("unqualified-search-registries = []\n")
    config = RegistriesConfig.load(path)
    assert config.unqualified_search_registries == ()
    assert config.search_registries == ("docker.io",)


def test_v1_in_a_dropin_is_refused(tmp_path: Path) -> None:
    (tmp_path / "registries.conf.d").mkdir()
    dropin = tmp_path / "registries.conf.d" / "old.conf"
    dropin.write_text('[registries.search]\nregistries = ["quay.io"]\n')
    with pytest.raises(RegistriesConfigError, match="not allowed in drop-in files") as info:
        RegistriesConfig.load(tmp_path / "registries.conf")
    assert str(dropin) in info.value.message


def test_dropin_error_names_the_dropin(tmp_path: Path) -> None:
    (tmp_path / "registries.conf.d").mkdir()
    dropin = tmp_path / "registries.conf.d" / "bad.conf"
    dropin.write_text('[[registry]]\nlocation = "example.com"\nblockd = true\n')
    with pytest.raises(RegistriesConfigError, match='unknown key "blockd"') as info:
        RegistriesConfig.load(tmp_path / "registries.conf")
    assert info.value.message.startswith(str(dropin))


def test_config_is_hashable_and_comparable() -> None:
    assert conf(ALIASES) == conf(ALIASES)
    assert hash(conf(MAN_PAGE_EXAMPLE)) == hash(conf(MAN_PAGE_EXAMPLE))
