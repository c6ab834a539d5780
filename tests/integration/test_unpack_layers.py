"""The layer unpacker for real: tars built here, the chrooted helper run through unpack_layer.

Needs root (chroot, mknod, chown, trusted.* xattrs, overlay mounts).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from moorage.errors import InvalidArgument
from moorage.image.unpacker import (
    Compression,
    LayerTooLarge,
    UnpackError,
    UnpackResult,
    unpack_layer,
)
from tests.fixtures.procs import pids_where

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

MTIME = 1_600_000_000
#: security.capability for cap_net_raw+ep (vfs_cap_data revision 2).
CAP_NET_RAW = b"\x01\x00\x00\x02" + (1 << 13).to_bytes(4, "little") + bytes(12)

Member = tuple[tarfile.TarInfo, bytes | None]


# -- building layers ---------------------------------------------------------------------------


def _info(name: str, kind: bytes, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = MTIME
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def file(name: str, data: bytes = b"", **fields: object) -> Member:
    info = _info(name, tarfile.REGTYPE, **fields)
    info.size = len(data)
    return info, data


def directory(name: str, **fields: object) -> Member:
    return _info(name, tarfile.DIRTYPE, **fields), None


def symlink(name: str, target: str, **fields: object) -> Member:
    return _info(name, tarfile.SYMTYPE, linkname=target, mode=0o777, **fields), None


def hardlink(name: str, target: str) -> Member:
    return _info(name, tarfile.LNKTYPE, linkname=target), None


def device(name: str, major: int, minor: int, kind: bytes = tarfile.CHRTYPE) -> Member:
    return _info(name, kind, devmajor=major, devminor=minor, mode=0o666), None


def fifo(name: str) -> Member:
    return _info(name, tarfile.FIFOTYPE), None


def tar(*members: Member, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def compress(data: bytes, compression: Compression) -> bytes:
    if compression == "gzip":
        return gzip.compress(data)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


async def unpack(
    tmp_path: Path,
    blob: bytes,
    compression: Compression = "none",
    max_size: int | None = None,
) -> tuple[Path, UnpackResult]:
    path = tmp_path / "blob"
    path.write_bytes(blob)
    dest = tmp_path / "layers" / "l1"
    return dest, await unpack_layer(path, dest, compression, max_size=max_size)


async def run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv)
    assert await proc.wait() == 0, argv


def outside(tmp_path: Path) -> set[str]:
    """Every path under tmp_path except the layer directories, for "nothing escaped" checks."""
    found = set()
    for root, dirs, files in os.walk(tmp_path):
        if root == str(tmp_path):
            dirs[:] = [d for d in dirs if d != "layers"]
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(root, name), tmp_path))
    return found


# -- a well-formed layer -----------------------------------------------------------------------


def rootfs_layer() -> bytes:
    ping_xattrs = {
        "SCHILY.xattr.security.capability": CAP_NET_RAW.decode("utf-8", "surrogateescape"),
        "SCHILY.xattr.user.origin": "moorage-test",
    }
    return tar(
        directory("./"),
        directory("./etc", mode=0o755),
        file("./etc/hostname", b"box\n", mode=0o644),
        symlink("./etc/localtime", "/usr/share/zoneinfo/UTC"),
        symlink("./etc/relative", "hostname", uid=1000, gid=1000),
        directory("./usr/bin", mode=0o755),  # no entry for usr: created implicitly
        file("./usr/bin/su", b"\x7fELF su", mode=0o4755),
        file("./usr/bin/owned", b"mine", mode=0o6750, uid=1000, gid=1000),
        file("./usr/bin/ping", b"\x7fELF ping", mode=0o755, pax_headers=ping_xattrs),
        hardlink("./usr/bin/su-again", "./usr/bin/su"),
        directory("./tmp", mode=0o1777),
        directory("./home/user", mode=0o700, uid=1000, gid=1000, mtime=MTIME + 5),
        file("./home/user/.profile", b"x" * 70000, uid=1000, gid=1000),
        device("./dev/null", 1, 3),
        device("./dev/loop0", 7, 0, tarfile.BLKTYPE),
        fifo("./run/initctl"),
        file("./precise", b"", pax_headers={"mtime": f"{MTIME}.123456789"}),
        file("./empty", b""),
    )


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
async def test_rootfs_layer(tmp_path: Path, compression: Compression) -> None:
    raw = rootfs_layer()
    dest, result = await unpack(tmp_path, compress(raw, compression), compression)

    assert result == UnpackResult(
        diff_id="sha256:" + hashlib.sha256(raw).hexdigest(), size=len(raw), entries=18
    )
    assert (dest / "etc/hostname").read_bytes() == b"box\n"
    assert os.readlink(dest / "etc/localtime") == "/usr/share/zoneinfo/UTC"
    rel = os.lstat(dest / "etc/relative")
    assert (rel.st_uid, rel.st_gid) == (1000, 1000)
    assert stat.S_ISDIR(os.lstat(dest / "usr").st_mode)

    su = os.lstat(dest / "usr/bin/su")
    assert stat.S_IMODE(su.st_mode) == 0o4755
    assert (su.st_uid, su.st_gid) == (0, 0)
    assert su.st_nlink == 2
    assert os.lstat(dest / "usr/bin/su-again").st_ino == su.st_ino
    owned = os.lstat(dest / "usr/bin/owned")
    assert stat.S_IMODE(owned.st_mode) == 0o6750  # chown came first, so setuid survived
    assert (owned.st_uid, owned.st_gid) == (1000, 1000)

    ping = dest / "usr/bin/ping"
    assert os.getxattr(ping, "security.capability") == CAP_NET_RAW
    assert os.getxattr(ping, "user.origin") == b"moorage-test"

    tmp = os.lstat(dest / "tmp")
    assert stat.S_ISDIR(tmp.st_mode) and stat.S_IMODE(tmp.st_mode) == 0o1777
    home = os.lstat(dest / "home/user")
    assert (home.st_uid, stat.S_IMODE(home.st_mode)) == (1000, 0o700)
    assert home.st_mtime_ns == (MTIME + 5) * 10**9  # set after its child was written
    assert (dest / "home/user/.profile").read_bytes() == b"x" * 70000

    null = os.lstat(dest / "dev/null")
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666
    loop = os.lstat(dest / "dev/loop0")
    assert stat.S_ISBLK(loop.st_mode) and loop.st_rdev == os.makedev(7, 0)
    assert stat.S_ISFIFO(os.lstat(dest / "run/initctl").st_mode)

    assert os.lstat(dest / "etc/hostname").st_mtime_ns == MTIME * 10**9
    assert os.lstat(dest / "etc/localtime").st_mtime_ns == MTIME * 10**9
    assert os.lstat(dest / "precise").st_mtime_ns == MTIME * 10**9 + 123456789
    assert os.lstat(dest / "etc").st_mtime_ns == MTIME * 10**9
    assert (dest / "empty").read_bytes() == b""


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
async def test_multi_member_and_multi_frame_streams(
    tmp_path: Path, compression: Compression
) -> None:
    raw = rootfs_layer()
    cut = len(raw) // 3
    blob = compress(raw[:cut], compression) + compress(raw[cut:], compression)
    dest, result = await unpack(tmp_path, blob, compression)
    assert result.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert (dest / "home/user/.profile").read_bytes() == b"x" * 70000


async def test_empty_layer(tmp_path: Path) -> None:
    raw = tar()
    dest, result = await unpack(tmp_path, gzip.compress(raw), "gzip")
    assert result == UnpackResult("sha256:" + hashlib.sha256(raw).hexdigest(), len(raw), 0)
    assert list(dest.iterdir()) == []


async def test_later_entries_replace_earlier_ones(tmp_path: Path) -> None:
    raw = tar(
        file("f", b"one"),
        file("f", b"two", mode=0o600),
        directory("d"),
        file("d/child", b"x"),
        symlink("d", "/elsewhere"),
        symlink("s", "/first"),
        file("s", b"now a file"),
        file("x", b"file first"),
        directory("x", mode=0o750),
        file("x/inside", b"in"),
        directory("keep", mode=0o700),
        directory("keep", mode=0o755),
    )
    dest, _ = await unpack(tmp_path, raw)
    assert (dest / "f").read_bytes() == b"two"
    assert stat.S_IMODE(os.lstat(dest / "f").st_mode) == 0o600
    assert os.readlink(dest / "d") == "/elsewhere"
    assert (dest / "s").read_bytes() == b"now a file"
    assert stat.S_IMODE(os.lstat(dest / "x").st_mode) == 0o750
    assert (dest / "x/inside").read_bytes() == b"in"
    assert stat.S_IMODE(os.lstat(dest / "keep").st_mode) == 0o755


async def test_whiteouts_become_overlay_whiteouts(tmp_path: Path) -> None:
    raw = tar(
        file(".wh.gone", uid=1000, gid=1000),
        directory("etc"),
        file("etc/.wh.passwd"),
        directory("var/cache"),
        file("var/cache/.wh..wh..opq"),
        file("var/cache/fresh", b"new"),
        directory("dir"),
        file("dir/child", b"replaced below"),
        file(".wh.dir"),
        file("only/.wh..wh..opq"),  # the directory does not exist yet
    )
    dest, result = await unpack(tmp_path, raw)
    assert result.entries == 10
    for path in ("gone", "etc/passwd", "dir"):
        st = os.lstat(dest / path)
        assert stat.S_ISCHR(st.st_mode), path
        assert st.st_rdev == os.makedev(0, 0), path
    assert os.lstat(dest / "gone").st_uid == 1000
    assert os.getxattr(dest / "var/cache", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(dest / "only", "trusted.overlay.opaque") == b"y"
    assert (dest / "var/cache/fresh").read_bytes() == b"new"
    leftovers = [p for p in dest.rglob("*") if p.name.startswith(".wh.")]
    assert leftovers == []


async def test_sparse_file_keeps_its_holes(tmp_path: Path) -> None:
    # GNU sparse format 1.0 (what GNU tar --sparse writes in PAX archives): the data area
    # starts with the map, then holds the data regions back to back.
    realsize = 64 << 20
    sparse_map = f"2\n0\n4\n{realsize - 8}\n4\n".encode()
    data = sparse_map.ljust(512, b"\0") + b"AAAA" + b"BBBB"
    info, _ = file("GNUSparseFile.0/big", data)
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": "big",
        "GNU.sparse.realsize": str(realsize),
    }
    dest, _ = await unpack(tmp_path, gzip.compress(tar((info, data))), "gzip")
    big = dest / "big"
    st = os.lstat(big)
    assert st.st_size == realsize
    assert st.st_blocks * 512 < 1 << 20  # the holes were not written
    with big.open("rb") as f:
        assert f.read(4) == b"AAAA"
        f.seek(realsize - 8)
        assert f.read() == b"BBBB\0\0\0\0"  # a hole at the end too


# -- overlayfs reads what we wrote ---------------------------------------------------------------


async def test_overlay_mount_honours_whiteouts(tmp_path: Path) -> None:
    lower = tar(
        file("a", b"lower a"),
        file("keep", b"kept"),
        directory("dir"),
        file("dir/old", b"hidden by opaque"),
        directory("gone-dir"),
        file("gone-dir/x", b"x"),
    )
    upper = tar(
        file(".wh.a"),
        file(".wh.gone-dir"),
        directory("dir"),
        file("dir/.wh..wh..opq"),
        file("dir/new", b"from upper"),
    )
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "lower").write_bytes(gzip.compress(lower))
    (blobs / "upper").write_bytes(zstandard.ZstdCompressor().compress(upper))
    l1, l2 = tmp_path / "layers/1", tmp_path / "layers/2"
    await unpack_layer(blobs / "lower", l1, "gzip")
    await unpack_layer(blobs / "upper", l2, "zstd")

    merged = tmp_path / "merged"
    merged.mkdir()
    await run("mount", "-t", "overlay", "overlay", "-o", f"lowerdir={l2}:{l1}", str(merged))
    try:
        assert sorted(p.name for p in merged.iterdir()) == ["dir", "keep"]
        assert (merged / "keep").read_bytes() == b"kept"
        assert sorted(p.name for p in (merged / "dir").iterdir()) == ["new"]
        assert (merged / "dir/new").read_bytes() == b"from upper"
    finally:
        await run("umount", str(merged))


# -- hostile layers ----------------------------------------------------------------------------


def _hostile_layers(tmp_path: Path) -> Iterator[tuple[str, bytes, str]]:
    victim = tmp_path / "victim"
    yield "dotdot", tar(file("../evil", b"pwned")), "'..'"
    yield "dotdot-dot", tar(file("./../evil", b"pwned")), "'..'"
    yield "absolute", tar(file("/abs/evil", b"pwned")), "is absolute"
    yield "dotdot-inside", tar(file("a/../../evil", b"pwned")), "'..'"
    yield (
        "symlink-absolute",
        tar(symlink("x", str(victim)), file("x/pwned", b"pwned")),
        "symlink escape",
    )
    yield (
        "symlink-relative",
        tar(symlink("x", "../../.."), file("x/pwned", b"pwned")),
        "symlink escape",
    )
    yield (
        "symlink-deep",
        tar(directory("a"), symlink("a/x", str(victim)), directory("a/x/sub")),
        "symlink escape",
    )
    yield (
        "symlink-opaque",
        tar(symlink("x", str(victim)), file("x/.wh..wh..opq")),
        "symlink escape",
    )
    yield (
        "symlink-whiteout",
        tar(symlink("x", str(victim)), file("x/.wh.file")),
        "symlink escape",
    )
    yield (
        "hardlink-absolute",
        tar(hardlink("passwd", "/etc/passwd")),
        "hardlink target '/etc/passwd' is absolute",
    )
    yield (
        "hardlink-dotdot",
        tar(hardlink("h", "../outside")),
        "hardlink target '../outside' has a '..' component",
    )
    yield (
        "hardlink-missing",
        tar(hardlink("h", "not/there")),
        "does not exist earlier in this layer",
    )
    yield (
        "hardlink-directory",
        tar(directory("d"), hardlink("h", "d")),
        "hardlink target 'd' is a directory",
    )
    yield (
        "hardlink-through-symlink",
        tar(symlink("x", "/etc"), hardlink("h", "x/passwd")),
        "symlink escape",
    )
    yield (
        "unknown-type",
        tar((_info("tape", b"V"), None)),
        "unsupported entry type b'V'",
    )
    yield ("whiteout-metadata", tar(file(".wh..wh.plnk")), "whiteout metadata")
    yield ("whiteout-as-dir", tar(file(".wh..wh.plnk/1")), "reserved whiteout name")
    yield (
        "reserved-xattr",
        tar(file("f", pax_headers={"SCHILY.xattr.trusted.overlay.redirect": "/etc"})),
        "reserved for overlayfs",
    )
    yield (
        "huge-pax-header",
        tar(file("f", pax_headers={"comment": "x" * (2 << 20)})),
        "tar metadata header of 2097",
    )
    yield (
        "huge-long-name",
        tar(file("d/" * 600_000 + "f"), fmt=tarfile.GNU_FORMAT),
        "tar metadata header of 1200",
    )
    yield "file-as-root", tar(file("./", b"")), "layer root can only be a directory"
    yield "file-as-parent", tar(file("f"), file("f/g")), "parent 'f' is not a directory"


HOSTILE = [case for case, _, _ in _hostile_layers(Path("/"))]


@pytest.mark.parametrize("case", HOSTILE)
async def test_hostile_layer_is_refused(tmp_path: Path, case: str) -> None:
    (tmp_path / "victim").mkdir()
    layers = {name: (raw, reason) for name, raw, reason in _hostile_layers(tmp_path)}
    raw, reason = layers[case]
    (tmp_path / "blob").write_bytes(raw)
    passwd_links = os.stat("/etc/passwd").st_nlink
    before = outside(tmp_path)

    with pytest.raises(UnpackError, match="refused") as info:
        await unpack(tmp_path, raw)

    assert reason in info.value.message
    assert outside(tmp_path) == before
    assert list((tmp_path / "victim").iterdir()) == []
    assert os.stat("/etc/passwd").st_nlink == passwd_links
    assert escaped(tmp_path) == []


def escaped(tmp_path: Path) -> list[str]:
    """What the hostile layers try to write outside their directory, if it exists."""
    paths = ["/abs/evil", "/evil", "/pwned"]
    paths += [str(tmp_path.parent / "evil"), str(tmp_path.parent / "pwned")]
    return [path for path in paths if os.path.lexists(path)]


@pytest.mark.parametrize(
    ("compression", "blob", "reason"),
    [
        ("gzip", gzip.compress(rootfs_layer())[:-200], "corrupt or truncated gzip stream"),
        ("gzip", b"\x00garbage\xff" * 100, "corrupt or truncated gzip stream"),
        ("zstd", zstandard.ZstdCompressor().compress(rootfs_layer())[:-50], "truncated zstd"),
        ("zstd", b"\x00garbage\xff" * 100, "corrupt or truncated zstd stream"),
        ("none", b"\x00garbage\xff" * 100, "corrupt tar"),
        ("none", b"", "empty tar stream"),
        ("none", tar(file("a", b"a" * 1000))[:1536], "without an end-of-archive marker"),
        ("none", tar(file("a", b"a" * 1000))[:1000], "ends inside the entry's data"),
        ("gzip", gzip.compress(tar(file("a"))[:512] + bytes(512) + tar(file("b"))), "lone zero"),
    ],
    ids=[
        "gzip-truncated",
        "gzip-garbage",
        "zstd-truncated",
        "zstd-garbage",
        "tar-garbage",
        "tar-empty",
        "tar-no-end-marker",
        "tar-cut-in-data",
        "tar-lone-zero-block",
    ],
)
async def test_corrupt_stream_is_refused(
    tmp_path: Path, compression: Compression, blob: bytes, reason: str
) -> None:
    before = outside(tmp_path)
    with pytest.raises(UnpackError, match="refused") as info:
        await unpack(tmp_path, blob, compression)
    assert reason in info.value.message
    assert outside(tmp_path) - before == {"blob"}


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
async def test_max_size(tmp_path: Path, compression: Compression) -> None:
    raw = tar(file("big", bytes(4 << 20)))
    before = outside(tmp_path)
    with pytest.raises(LayerTooLarge, match="larger than the limit of 1048576 uncompressed bytes"):
        await unpack(tmp_path, compress(raw, compression), compression, max_size=1 << 20)
    assert outside(tmp_path) - before == {"blob"}
    again = tmp_path / "again"
    again.mkdir()
    _, result = await unpack(again, compress(raw, compression), compression, len(raw))
    assert result.size == len(raw)


async def test_max_entries(tmp_path: Path) -> None:
    raw = tar(*(file(f"f{i}", b"x") for i in range(50)))
    path = tmp_path / "blob"
    path.write_bytes(raw)
    with pytest.raises(LayerTooLarge, match="more than 49 entries") as info:
        await unpack_layer(path, tmp_path / "layers/l1", "none", max_entries=49)
    assert info.value.code == "RESOURCE_EXHAUSTED"
    result = await unpack_layer(path, tmp_path / "layers/l2", "none", max_entries=50)
    assert result.entries == 50


def test_helper_refuses_imports_after_chroot(tmp_path: Path) -> None:
    # Once chrooted, the host's module paths lead into the layer: nothing may be imported.
    planted = tmp_path / "layer" / str(tmp_path).lstrip("/") / "plant"
    planted.mkdir(parents=True)
    (planted / "planted_module.py").write_text("print('code from the layer ran')\n")
    script = (
        "import sys, codecs\n"
        f"sys.path.insert(0, {str(tmp_path / 'plant')!r})\n"
        "from moorage.image.unpack.__main__ import _confine\n"
        f"_confine({str(tmp_path / 'layer')!r})\n"
        "for name in ('planted_module', 'xml.dom', 'json.tool'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ImportError as e:\n"
        "        print('refused:', e)\n"
        "try:\n"
        "    codecs.lookup('cp1252')\n"
        "except LookupError:\n"
        "    print('no codec')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd="/"
    )
    assert "code from the layer ran" not in done.stdout
    assert done.stdout.count("refused: import of") == 3
    assert "no codec" in done.stdout


# -- the wrapper -------------------------------------------------------------------------------


async def test_dest_must_be_empty(tmp_path: Path) -> None:
    (tmp_path / "blob").write_bytes(tar(file("a")))
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "stray").touch()
    with pytest.raises(UnpackError, match="not empty"):
        await unpack_layer(tmp_path / "blob", dest, "none")


async def test_missing_blob(tmp_path: Path) -> None:
    with pytest.raises(UnpackError, match="cannot open layer blob"):
        await unpack_layer(tmp_path / "nope", tmp_path / "dest", "none")


async def test_unknown_compression(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="bzip2"):
        await unpack_layer(tmp_path / "blob", tmp_path / "dest", "bzip2")  # type: ignore[arg-type]


def _helpers_for(dest: Path) -> list[int]:
    """Pids of unpack helpers working on ``dest`` (read from /proc; touches nothing)."""
    return pids_where(lambda a: b"moorage.image.unpack" in a and str(dest).encode() in a)


async def test_cancel_kills_the_helper(tmp_path: Path) -> None:
    # 1 GiB of zeros: little zstd, but it takes the helper a while to write out.
    cobj = zstandard.ZstdCompressor().compressobj()
    size = 1 << 30
    header = tarfile.TarInfo("huge")
    header.size = size
    parts = [cobj.compress(header.tobuf(tarfile.PAX_FORMAT))]
    zeros = bytes(1 << 20)
    parts += [cobj.compress(zeros) for _ in range(size >> 20)]
    parts.append(cobj.compress(bytes(1024)))
    parts.append(cobj.flush())
    blob = tmp_path / "blob"
    blob.write_bytes(b"".join(parts))
    dest = tmp_path / "dest"

    task = asyncio.create_task(unpack_layer(blob, dest, "zstd"))
    for _ in range(1000):
        await asyncio.sleep(0.01)
        if _helpers_for(dest) and (dest / "huge").exists():
            break
    else:
        pytest.fail("the helper never started writing")
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _helpers_for(dest) == []
    shutil.rmtree(dest)  # pytest keeps the last runs' tmp dirs: do not leave a GiB behind
