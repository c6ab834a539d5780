"""Image reference grammar and normalisation (moorage.image.reference)."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from moorage.errors import InvalidArgument
from moorage.image import reference as refs
from moorage.image.reference import Reference, is_short_name, normalize, parse, with_domain

SHA256 = "sha256:" + "f" * 64
SHA384 = "sha384:" + "a" * 96
SHA512 = "sha512:" + "0123456789abcdef" * 8


# input -> (domain, path, tag, digest)
VALID = [
    ("busybox", ("docker.io", "library/busybox", None, None)),
    ("busybox:1.36", ("docker.io", "library/busybox", "1.36", None)),
    ("user/img", ("docker.io", "user/img", None, None)),
    ("user/img:v1", ("docker.io", "user/img", "v1", None)),
    ("docker.io/busybox", ("docker.io", "library/busybox", None, None)),
    ("docker.io/library/busybox:latest", ("docker.io", "library/busybox", "latest", None)),
    ("index.docker.io/busybox", ("docker.io", "library/busybox", None, None)),
    ("index.docker.io/user/img:t", ("docker.io", "user/img", "t", None)),
    ("docker.io/a/b/c", ("docker.io", "a/b/c", None, None)),
    ("localhost/foo", ("localhost", "foo", None, None)),
    ("localhost:5000/foo/bar:t", ("localhost:5000", "foo/bar", "t", None)),
    ("127.0.0.1:5000/x", ("127.0.0.1:5000", "x", None, None)),
    ("192.168.1.1/repo", ("192.168.1.1", "repo", None, None)),
    ("192.168.1.1:5000/repo:5050", ("192.168.1.1:5000", "repo", "5050", None)),
    ("[::1]:5000/x", ("[::1]:5000", "x", None, None)),
    ("[2001:db8::1]/repo", ("[2001:db8::1]", "repo", None, None)),
    ("[2001:db8:1:2:3:4:5:6]/repo:tag", ("[2001:db8:1:2:3:4:5:6]", "repo", "tag", None)),
    ("[2001:db8::1]:5000/repo@" + SHA256, ("[2001:db8::1]:5000", "repo", None, SHA256)),
    ("test:5000/repo", ("test:5000", "repo", None, None)),
    ("test:5000/repo:tag@" + SHA256, ("test:5000", "repo", "tag", SHA256)),
    ("quay.io/a/b@" + SHA256, ("quay.io", "a/b", None, SHA256)),
    ("quay.io/a/b:t@" + SHA384, ("quay.io", "a/b", "t", SHA384)),
    ("quay.io/a/b@" + SHA512, ("quay.io", "a/b", None, SHA512)),
    ("busybox@" + SHA256, ("docker.io", "library/busybox", None, SHA256)),
    ("test_com", ("docker.io", "library/test_com", None, None)),
    ("test.com:tag", ("docker.io", "library/test.com", "tag", None)),
    ("test.com:5000", ("docker.io", "library/test.com", "5000", None)),
    ("192.168.1.1", ("docker.io", "library/192.168.1.1", None, None)),
    ("localhost", ("docker.io", "library/localhost", None, None)),
    ("lowercase:Uppercase", ("docker.io", "library/lowercase", "Uppercase", None)),
    ("foo/foo_bar.com:8080", ("docker.io", "foo/foo_bar.com", "8080", None)),
    (
        "sub-dom1.foo.com/bar/baz/quux:some-long-tag",
        ("sub-dom1.foo.com", "bar/baz/quux", "some-long-tag", None),
    ),
    (
        "b.gcr.io/test.example.com/my-app:test.example.com",
        ("b.gcr.io", "test.example.com/my-app", "test.example.com", None),
    ),
    ("xn--n3h.com/myimage:xn--n3h.com", ("xn--n3h.com", "myimage", "xn--n3h.com", None)),
    ("a/b__c/d-e/f---g/h.i/j_k", ("docker.io", "a/b__c/d-e/f---g/h.i/j_k", None, None)),
    # An uppercase first component is read as a host name (as Docker does).
    ("Uppercase/lowercase:tag", ("Uppercase", "lowercase", "tag", None)),
    ("Example.COM/x", ("Example.COM", "x", None, None)),
    ("example.com/x:" + "t" * 128, ("example.com", "x", "t" * 128, None)),
    ("example.com/x:_t", ("example.com", "x", "_t", None)),
]


@pytest.mark.parametrize(("text", "expected"), VALID, ids=[v[0][:60] for v in VALID])
def test_parse_valid(text: str, expected: tuple[str, str, str | None, str | None]) -> None:
    ref = parse(text)
    assert (ref.domain, ref.path, ref.tag, ref.digest) == expected
    assert parse(str(ref)) == ref


# input -> a fragment of the reason
INVALID = [
    ("", "empty reference"),
    (" busybox", "whitespace"),
    ("busybox ", "whitespace"),
    ("busy box", "whitespace"),
    ("busybox\n", "whitespace"),
    ("bü", "non-ASCII"),
    ("::", "empty tag"),
    (":", "empty tag"),
    ("busybox:", "empty tag"),
    ("quay.io/a/b:", "empty tag"),
    (":justtag", "missing repository name"),
    ("@" + SHA256, "missing repository name"),
    ("busybox@", "invalid digest"),
    ("busybox@sha256", "invalid digest"),
    ("busybox@sha256:", "invalid sha256 digest"),
    ("repo@sha256:" + "f" * 34, "invalid sha256 digest"),
    ("repo@sha256:" + "f" * 65, "invalid sha256 digest"),
    ("repo@sha256:" + "F" * 64, "lowercase hex"),
    ("repo@sha256:" + "g" * 64, "lowercase hex"),
    ("repo@sha384:" + "a" * 64, "96 lowercase hex"),
    ("repo@sha512:" + "a" * 64, "128 lowercase hex"),
    ("validname@invaliddigest:" + "f" * 64, "unsupported digest algorithm"),
    ("repo@md5:" + "f" * 32, "unsupported digest algorithm"),
    ("repo@1sha:" + "f" * 64, "invalid digest"),
    ("repo@" + SHA256 + "@" + SHA256, "invalid sha256 digest"),
    ("Uppercase", "must be lowercase"),
    ("Uppercase:tag", "must be lowercase"),
    ("quay.io/Upper/x", "must be lowercase"),
    ("test:5000/Uppercase/lowercase:tag", "must be lowercase"),
    ("aa/asdf$$^/aa", "invalid path component"),
    ("a//b", "empty path component"),
    ("a/b/", "empty path component"),
    ("/a", "empty path component"),
    ("quay.io/", "empty path component"),
    ("-a", "invalid path component"),
    ("a-", "invalid path component"),
    ("a..b", "invalid path component"),
    ("a___b", "invalid path component"),
    ("a.-b", "invalid path component"),
    ("_a", "invalid path component"),
    ("busybox:.tag", "invalid tag"),
    ("busybox:-tag", "invalid tag"),
    ("busybox:t!", "invalid tag"),
    ("busybox:t/x", "invalid registry host"),
    ("busybox:" + "t" * 129, "invalid tag"),
    ("busybox:tä", "non-ASCII"),
    ("[2001:db8::1]", "invalid tag '1]'"),
    ("[2001:db8::1]:5000", "invalid path component"),
    ("[2001:db8::1]:tag", "invalid path component"),
    ("[fe80::1%eth0]:5000/repo", "invalid registry host"),
    ("[fe80::1%@invalidzone]:5000/repo", "invalid"),
    ("-bad.com/x", "invalid registry host"),
    ("bad-.com/x", "invalid registry host"),
    ("quay.io:port/x", "invalid registry host"),
    ("quay.io:/x", "invalid registry host"),
    ("a" * 64, "image ID"),
    ("a/" * 128 + "a:tag", "longer than 255"),
    ("a/" * 127 + "a", "longer than 255"),
    ("example.com/" + "a" * 244, "longer than 255"),
]


@pytest.mark.parametrize(("text", "why"), INVALID, ids=[i[0][:60] for i in INVALID])
def test_parse_invalid(text: str, why: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse(text)
    assert info.value.message.startswith("invalid image reference ")
    assert why in info.value.message


def test_name_length_limit_is_on_the_normalised_name() -> None:
    longest = "example.com/" + "a" * (255 - len("example.com/"))
    assert len(parse(longest).name) == 255


def test_error_message_quotes_the_input_on_one_line() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse('a"b\nc')
    assert "\n" not in info.value.message
    assert 'invalid image reference "a\\"b\\nc"' in info.value.message


def test_non_string_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument):
        parse(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("user/img", "docker.io/user/img:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("busybox@" + SHA256, "docker.io/library/busybox@" + SHA256),
        ("busybox:1@" + SHA256, "docker.io/library/busybox:1@" + SHA256),
        ("quay.io/a/b", "quay.io/a/b:latest"),
        ("index.docker.io/library/busybox", "docker.io/library/busybox:latest"),
        ("localhost:5000/x", "localhost:5000/x:latest"),
    ],
)
def test_normalize(text: str, expected: str) -> None:
    assert str(normalize(text)) == expected
    assert normalize(expected) == normalize(text)


@pytest.mark.parametrize(
    ("text", "short"),
    [
        ("busybox", True),
        ("busybox:1", True),
        ("busybox@" + SHA256, True),
        ("user/img", True),
        ("user/img:tag", True),
        ("library/busybox", True),
        ("a/b/c", True),
        ("test.com:5000", True),  # a name with a tag, not a host
        ("localhost", True),
        ("localhost/x", False),
        ("localhost:5000/x", False),
        ("docker.io/busybox", False),
        ("quay.io/a/b", False),
        ("myhost:5000/x", False),
        ("[::1]/x", False),
        ("Upper/x", False),
    ],
)
def test_is_short_name(text: str, short: bool) -> None:
    assert is_short_name(text) is short


@pytest.mark.parametrize(
    ("short", "domain", "expected"),
    [
        ("busybox", "quay.io", "quay.io/busybox:latest"),
        ("busybox", "docker.io", "docker.io/library/busybox:latest"),
        ("busybox", "index.docker.io", "docker.io/library/busybox:latest"),
        ("user/img:1", "docker.io", "docker.io/user/img:1"),
        ("user/img:1", "quay.io", "quay.io/user/img:1"),
        ("busybox@" + SHA256, "localhost:5000", "localhost:5000/busybox@" + SHA256),
        ("busybox", "localhost", "localhost/busybox:latest"),
        ("busybox", "[::1]:5000", "[::1]:5000/busybox:latest"),
    ],
)
def test_with_domain(short: str, domain: str, expected: str) -> None:
    assert str(with_domain(short, domain)) == expected


@pytest.mark.parametrize(
    ("short", "domain", "why"),
    [
        ("quay.io/busybox", "docker.io", "is not a short name"),
        ("busybox", "myhost", "is not a registry host"),
        ("busybox", "quay.io/path", "is not a registry host"),
        ("busybox", "", "is not a registry host"),
        ("Busybox", "quay.io", "must be lowercase"),
        ("busybox", "example.com:5000" + "0" * 250, "longer than 255"),
    ],
)
def test_with_domain_invalid(short: str, domain: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why):
        with_domain(short, domain)


@pytest.mark.parametrize(
    ("text", "familiar"),
    [
        ("busybox", "busybox"),
        ("docker.io/library/busybox:1", "busybox:1"),
        ("docker.io/user/img", "user/img"),
        ("docker.io/library/a/b", "library/a/b"),
        ("quay.io/a/b:t", "quay.io/a/b:t"),
        ("busybox@" + SHA256, "busybox@" + SHA256),
    ],
)
def test_familiar(text: str, familiar: str) -> None:
    ref = parse(text)
    assert ref.familiar == familiar
    assert parse(ref.familiar) == ref


def test_reference_properties_and_helpers() -> None:
    ref = Reference("quay.io", "a/b", "t", SHA256)
    assert ref.name == "quay.io/a/b"
    assert str(ref) == "quay.io/a/b:t@" + SHA256
    assert ref.name_only() == Reference("quay.io", "a/b")
    assert ref.with_tag("u") == Reference("quay.io", "a/b", "u", SHA256)
    assert ref.with_digest(SHA512).digest == SHA512
    with pytest.raises(InvalidArgument, match="invalid tag"):
        ref.with_tag("-x")
    with pytest.raises(InvalidArgument, match="unsupported digest algorithm"):
        ref.with_digest("md5:" + "0" * 32)


def test_split_does_not_normalise() -> None:
    assert refs.split("busybox:1") == refs.Parts(None, "busybox", "1", None)
    assert refs.split("docker.io/busybox") == refs.Parts("docker.io", "busybox", None, None)
    assert refs.split("index.docker.io/x") == refs.Parts("index.docker.io", "x", None, None)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("quay.io", True),
        ("localhost", True),
        ("localhost:5000", True),
        ("myhost:5000", True),
        ("[::1]:5000", True),
        ("127.0.0.1", True),
        ("myhost", False),
        ("quay.io/x", False),
        ("quay.io:", False),
        ("", False),
    ],
)
def test_is_domain(text: str, ok: bool) -> None:
    assert refs.is_domain(text) is ok


# ---------------------------------------------------------------------------------------
# Properties

_domain_component = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?", fullmatch=True)
_domain_name = st.lists(_domain_component, min_size=1, max_size=4).map(".".join)
_port = st.integers(min_value=0, max_value=99999).map(lambda p: f":{p}")
_ipv6 = st.from_regex(r"\[[a-fA-F0-9]{0,4}(:[a-fA-F0-9]{0,4}){1,7}\]", fullmatch=True)
_domain = st.one_of(
    st.tuples(_domain_name, st.one_of(st.just(""), _port)).map("".join),
    st.tuples(_ipv6, st.one_of(st.just(""), _port)).map("".join),
    st.just("localhost"),
)
_path_component = st.from_regex(
    r"[a-z0-9]{1,5}(([._]|__|-{1,3})[a-z0-9]{1,5}){0,3}", fullmatch=True
)
_path = st.lists(_path_component, min_size=1, max_size=4).map("/".join)
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,30}", fullmatch=True)
_digest = st.one_of(
    st.text("0123456789abcdef", min_size=64, max_size=64).map(lambda h: "sha256:" + h),
    st.text("0123456789abcdef", min_size=96, max_size=96).map(lambda h: "sha384:" + h),
    st.text("0123456789abcdef", min_size=128, max_size=128).map(lambda h: "sha512:" + h),
)


@st.composite
def valid_references(draw: st.DrawFn) -> str:
    text = draw(_path)
    domain = draw(st.one_of(st.none(), _domain))
    if domain is not None:
        text = f"{domain}/{text}"
    elif "/" in text:
        # A first component with a '.' would be read as a host name.
        first, _, rest = text.partition("/")
        text = first.replace(".", "-") + "/" + rest
    if draw(st.booleans()):
        text += ":" + draw(_tag)
    if draw(st.booleans()):
        text += "@" + draw(_digest)
    return text


@settings(max_examples=300)
@given(valid_references())
@example("busybox")
@example("docker.io/library/busybox:latest")
@example("[::1]:5000/x:t@" + SHA256)
def test_round_trip(text: str) -> None:
    try:
        ref = parse(text)
    except InvalidArgument as err:
        # Only the length limit may refuse a name built from the grammar.
        assert "longer than" in err.message
        return
    assert parse(str(ref)) == ref
    assert parse(ref.familiar) == ref
    assert normalize(str(normalize(text))) == normalize(text)
    assert ref.tag == (text.split("@")[0].rpartition(":")[2] if ref.tag else None)


# The distribution package's full reference pattern, anchored, ASCII as in Go.
_DIST_REFERENCE = re.compile(
    r"((?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|"
    r"[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*)*"
    r"(?::[\w][\w.-]{0,127})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?",
    re.ASCII,
)

_GRAMMAR_ALPHABET = "abcz019AZ.:/@_-[]%$ \t\nä"
_DIST_DOMAIN = re.compile(
    r"(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|"
    r"[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?",
    re.ASCII,
)
_DIST_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*", re.ASCII)


def _docker_accepts(text: str) -> bool:
    """The distribution grammar as Docker's normalisation reads it: the first of several
    components is a host exactly when it has '.' or ':', is 'localhost', or has an
    uppercase letter, and must then be a valid host, else a valid path component."""
    if not _DIST_REFERENCE.fullmatch(text):
        return False
    name = text.partition("@")[0]
    if name.rfind(":") > name.rfind("/"):
        name = name[: name.rfind(":")]
    first, slash, _ = name.partition("/")
    if not slash:
        return True
    if any(c in first for c in ".:") or first == "localhost" or first.lower() != first:
        return bool(_DIST_DOMAIN.fullmatch(first))
    return bool(_DIST_PATH_COMPONENT.fullmatch(first))


@settings(max_examples=500)
@given(
    st.one_of(
        st.text(max_size=40),
        st.text(_GRAMMAR_ALPHABET, max_size=30),
        st.tuples(valid_references(), st.text(_GRAMMAR_ALPHABET, max_size=3)).map("".join),
    )
)
@example("")
@example("::")
@example("a:")
@example("@")
@example("/")
@example("[")
@example("a@sha256:")
def test_garbage_only_raises_invalid_argument(text: str) -> None:
    try:
        ref = parse(text)
    except InvalidArgument as err:
        assert err.message.startswith("invalid image reference")
        if _docker_accepts(text) and "@" not in text:
            # The grammar accepts it: only our extra limits may refuse it.
            assert "longer than" in err.message or "image ID" in err.message, err.message
        return
    # Whatever is accepted is in the distribution grammar and round-trips.
    assert _docker_accepts(text), text
    assert parse(str(ref)) == ref


@given(st.text(max_size=30))
def test_is_short_name_never_raises(text: str) -> None:
    assert isinstance(is_short_name(text), bool)
