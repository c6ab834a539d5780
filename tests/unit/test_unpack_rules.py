"""The layer rules and media-type mapping of the unpacker: pure functions, no root needed."""

from __future__ import annotations

import pytest

from moorage.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from moorage.image.unpack.rules import (
    LayerError,
    Whiteout,
    check_id,
    clean_path,
    mtime_ns,
    parent_of,
    whiteout_of,
    xattrs_of,
)
from moorage.image.unpacker import (
    LayerTooLarge,
    UnpackError,
    UnpackResult,
    _parse_answer,
    compression_for_media_type,
)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("a", "a"),
        ("./a/b", "a/b"),
        ("././a", "a"),
        ("a//b/./c/", "a/b/c"),
        (".", ""),
        ("./", ""),
        ("a/b..c", "a/b..c"),
        ("..a/b", "..a/b"),
        (".wh.x", ".wh.x"),
        ("./ /", " "),
    ],
)
def test_clean_path_normalizes(raw: str, clean: str) -> None:
    assert clean_path(raw) == clean


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("/abs/evil", "absolute"),
        ("//x", "absolute"),
        ("./../evil", "'..'"),
        ("../evil", "'..'"),
        ("a/../../evil", "'..'"),
        ("a/..", "'..'"),
        ("a/b\x00c", "NUL"),
        ("", "empty"),
    ],
)
def test_clean_path_refuses(raw: str, reason: str) -> None:
    with pytest.raises(LayerError, match=reason):
        clean_path(raw)


def test_clean_path_names_the_field() -> None:
    with pytest.raises(LayerError, match="hardlink target '/etc/passwd' is absolute"):
        clean_path("/etc/passwd", "hardlink target '/etc/passwd'")


def test_parent_of() -> None:
    assert parent_of("a/b/c") == "a/b"
    assert parent_of("a") == ""


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("etc/passwd", None),
        ("etc/.whx", None),
        ("a.wh.b/c", None),
        ("etc/.wh.passwd", Whiteout("etc/passwd", opaque=False)),
        (".wh.top", Whiteout("top", opaque=False)),
        ("usr/.wh..wh..opq", Whiteout("usr", opaque=True)),
        (".wh..wh..opq", Whiteout("", opaque=True)),
        ("a/.wh..hidden", Whiteout("a/.hidden", opaque=False)),
    ],
)
def test_whiteout_of(path: str, expected: Whiteout | None) -> None:
    assert whiteout_of(path) == expected


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("a/.wh..wh.plnk", "metadata"),
        ("a/.wh.", "names no file"),
        ("a/.wh..", "names no file"),
        ("a/.wh...", "names no file"),
        (".wh..wh.plnk/1", "reserved whiteout name used as a directory"),
        ("a/.wh.b/c", "reserved whiteout name used as a directory in 'a/.wh.b'"),
        ("a/.wh..wh..opq/c", "reserved whiteout name"),
    ],
)
def test_whiteout_of_refuses(path: str, reason: str) -> None:
    with pytest.raises(LayerError, match=reason):
        whiteout_of(path)


def test_check_id() -> None:
    assert check_id(0, "uid") == 0
    assert check_id(2**32 - 2, "uid") == 2**32 - 2
    for bad in (-1, 2**32 - 1, 2**40):
        with pytest.raises(LayerError, match="uid"):
            check_id(bad, "uid")


def test_mtime_ns() -> None:
    assert mtime_ns(None, 1_600_000_000) == 1_600_000_000_000_000_000
    assert mtime_ns("1600000000.123456789", 1.6e9) == 1_600_000_000_123_456_789
    assert mtime_ns("1600000000.5", 1.6e9) == 1_600_000_000_500_000_000
    assert mtime_ns("1600000000.1234567891", 0) == 1_600_000_000_123_456_789
    assert mtime_ns("-1.5", 0) == -1_500_000_000
    assert mtime_ns("12", 0) == 12_000_000_000
    assert mtime_ns("junk", 7) == 7_000_000_000  # tarfile already fell back to the header


def test_xattrs_of_restores_binary_values() -> None:
    capability = b"\x01\x00\x00\x02\x00\x20\x00\x00" + bytes(12)
    headers = {
        "path": "bin/ping",
        "SCHILY.xattr.security.capability": capability.decode("utf-8", "surrogateescape"),
        "SCHILY.xattr.user.comment": "héllo",
    }
    assert dict(xattrs_of(headers)) == {
        "security.capability": capability,
        "user.comment": "héllo".encode(),
    }


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("SCHILY.xattr.trusted.overlay.opaque", "reserved"),
        ("SCHILY.xattr.trusted.overlay.redirect", "reserved"),
        ("SCHILY.xattr.", "invalid xattr name"),
    ],
)
def test_xattrs_of_refuses(key: str, reason: str) -> None:
    with pytest.raises(LayerError, match=reason):
        list(xattrs_of({key: "y"}))


@pytest.mark.parametrize(
    ("media_type", "compression"),
    [
        ("application/vnd.oci.image.layer.v1.tar", "none"),
        ("application/vnd.oci.image.layer.v1.tar+gzip", "gzip"),
        ("application/vnd.oci.image.layer.v1.tar+zstd", "zstd"),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar", "none"),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", "gzip"),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+zstd", "zstd"),
        ("application/vnd.docker.image.rootfs.diff.tar", "none"),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", "gzip"),
        ("application/vnd.docker.image.rootfs.diff.tar.zstd", "zstd"),
        ("application/vnd.docker.image.rootfs.foreign.diff.tar", "none"),
        ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "gzip"),
        ("Application/VND.OCI.Image.Layer.v1.Tar+Gzip; x=y", "gzip"),
    ],
)
def test_compression_for_media_type(media_type: str, compression: str) -> None:
    assert compression_for_media_type(media_type) == compression


@pytest.mark.parametrize(
    "media_type",
    [
        "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.oci.image.layer.v1.tar+bzip2",
        "",
    ],
)
def test_compression_for_unknown_media_type(media_type: str) -> None:
    with pytest.raises(InvalidArgument, match="unsupported layer media type"):
        compression_for_media_type(media_type)


def test_unpack_error_is_a_failed_precondition() -> None:
    assert issubclass(UnpackError, FailedPrecondition)
    assert UnpackError.code == "FAILED_PRECONDITION"


def test_parse_answer_success() -> None:
    out = b'{"diff_id": "sha256:ab", "size": 1024, "entries": 3}\n'
    assert _parse_answer("blob", 0, out, b"") == UnpackResult("sha256:ab", 1024, 3)


def test_parse_answer_refused() -> None:
    with pytest.raises(UnpackError, match="layer blob refused: entry '../x': path has"):
        _parse_answer("blob", 2, b'{"error": "entry \'../x\': path has"}\n', b"")


def test_parse_answer_crash_includes_stderr_tail() -> None:
    stderr = b"noise\n" * 1000 + b"Traceback: boom"
    with pytest.raises(UnpackError, match="(?s)exited with -9 and no answer: .*boom$") as info:
        _parse_answer("blob", -9, b"", stderr)
    assert len(info.value.message) < 2200


def test_parse_answer_limit_is_resource_exhausted() -> None:
    answer = b'{"error": "layer has more than 5 entries (max_layer_entries)"}\n'
    with pytest.raises(LayerTooLarge, match="layer sha256:ab refused: .*max_layer_entries"):
        _parse_answer("sha256:ab", 3, answer, b"")
    assert issubclass(LayerTooLarge, ResourceExhausted)


def test_parse_answer_cuts_a_huge_error() -> None:
    answer = ('{"error": "entry ' + "d/" * 5000 + ': File name too long"}\n').encode()
    with pytest.raises(UnpackError) as info:
        _parse_answer("blob", 2, answer, b"")
    assert len(info.value.message) < 2200
    assert info.value.message.endswith("File name too long")
